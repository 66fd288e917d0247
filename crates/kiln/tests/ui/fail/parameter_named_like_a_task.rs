use kiln::prelude::*;

// A task is a value named like its function, as a constant would be, so a parameter in the
// same scope cannot take that name: rustc reads it as the task, not a new binding.
#[task]
fn data() -> Vec<u8> {
    vec![1, 2, 3]
}

#[task]
fn checksum(data: Vec<u8>) -> u32 {
    data.iter().map(|b| u32::from(*b)).sum()
}

fn main() {}
