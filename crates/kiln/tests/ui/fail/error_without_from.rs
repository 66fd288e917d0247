use kiln::prelude::*;

#[derive(Debug)]
struct MyError;

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mine")
    }
}

// The error type must accept Kiln's own errors (timeouts, panics, ...).
#[task]
async fn strict() -> Result<u32, MyError> {
    Ok(1)
}

fn main() {}
