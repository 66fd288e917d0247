//! Compile-time checks of `#[task]` and `#[flow]`: what compiles, and the errors for misuse.

#[test]
fn macros() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
