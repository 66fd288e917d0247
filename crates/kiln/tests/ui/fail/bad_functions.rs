use kiln::prelude::*;

#[task]
fn generic<T: Clone>(x: T) -> T {
    x
}

#[task]
fn borrowed(name: &str) -> usize {
    name.len()
}

#[flow]
fn opaque(items: impl Iterator<Item = u8>) -> usize {
    items.count()
}

struct S;
impl S {
    #[task]
    fn method(&self) {}
}

#[task]
const fn constant() -> u32 {
    1
}

#[task]
struct NotAFunction;

fn main() {}
