use kiln::prelude::*;

#[task]
async fn work(x: u32) -> u32 {
    x
}

async fn caller() {
    // A task with options applied is called with `.call(...)`, never like a function,
    // so its options cannot be silently dropped.
    let _ = work.with_options(Options::new().retries(2))(1).await;
}

fn main() {}
