use kiln::prelude::*;

#[task(retries = "three")]
fn a() {}

#[task(timeout = -1)]
fn b() {}

#[task(timeout = "soon")]
fn c() {}

#[task(timeout = 0)]
fn d() {}

#[task(retry_delay = exponential())]
fn e() {}

#[task(retry_delay = exponential(1, jitter = 3))]
fn f() {}

#[task(tags = "one")]
fn g() {}

#[task(name = "")]
fn h() {}

#[task(retries = 2, retries = 3)]
fn i() {}

#[task(retry_if = 5)]
fn j() {}

#[task(timeout)]
fn k() {}

fn main() {}
