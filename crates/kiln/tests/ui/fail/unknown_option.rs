use kiln::prelude::*;

#[task(retires = 3)]
async fn typo() -> u32 {
    1
}

#[flow(persist_everything)]
async fn unknown() {}

fn main() {}
