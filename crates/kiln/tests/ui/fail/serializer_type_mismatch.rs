use kiln::prelude::*;

// PNG stores images: a task returning a number cannot use it.
#[task(persist, serializer = Png::default())]
fn count() -> u64 {
    3
}

#[task(storage_key = "counts/{parameters.missing}.bin")]
fn keyed(name: String) -> u64 {
    name.len() as u64
}

#[task(storage_key = "{run.idd}")]
fn typo() -> u64 {
    1
}

#[task(storage = "my results")]
fn spaced() -> u64 {
    1
}

fn main() {}
