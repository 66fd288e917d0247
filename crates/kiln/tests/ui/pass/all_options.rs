use kiln::prelude::*;

fn transient(e: &anyhow::Error) -> bool {
    e.to_string().contains("timeout")
}

#[task(
    name = "fetch-page",
    retries = 3,
    retry_delay = exponential(0.5, max = 30, jitter = 0.1),
    retry_if = transient,
    timeout = "1m 30s",
    tags = ["io", "http"]
)]
async fn fetch(url: String, mut attempts: u32) -> anyhow::Result<usize> {
    attempts += 1;
    Ok(url.len() + attempts as usize)
}

#[task(retry_delay = [1, 2.5, 10], timeout = 3)]
fn parse(body: Vec<u8>) -> usize {
    body.len()
}

#[task(retry_delay = 2)]
fn nothing() {}

#[flow(retries = 1, timeout = 600, tags = ["nightly"], retry_if = |e: &kiln::Error| e.is_retryable())]
async fn crawl(urls: Vec<String>) -> Result<usize, kiln::Error> {
    let _ = nothing().await;
    let sizes = kiln::join_all(parse.map(urls.iter().map(|u| u.clone().into_bytes()))).await?;
    Ok(sizes.into_iter().sum())
}

#[flow]
fn sync_flow((a, b): (u32, u32)) -> u32 {
    a + b
}

// Task names that are also common identifiers inside generated code.
#[task]
fn f(items: u32, options: u32) -> u32 {
    items + options
}

#[flow]
async fn args(error: u32) -> Result<u32, kiln::Error> {
    f(error, 1).await
}

fn main() {
    let _ = args(1);
    let _ = fetch;
    let _ = crawl(vec![]);
    let _ = sync_flow((1, 2));
    let _configured = fetch.with_options(Options::new().retries(1)).call("x".to_string(), 0);
}
