//! Retries, retry delays, retry_if, timeouts and panics, recorded as states.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln::StateType::*;
use kiln::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_task_is_retried_and_each_attempt_recorded() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    #[task(retries = 3, retry_delay = [0.01, 0.02])]
    async fn flaky() -> anyhow::Result<u32> {
        let n = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
        if n < 3 {
            anyhow::bail!("attempt {n}: connection reset");
        }
        Ok(n)
    }
    #[flow]
    async fn retrying() -> anyhow::Result<u32> {
        flaky().await
    }
    let home = support::home();
    let started = Instant::now();
    assert_eq!(home.engine.scope(retrying()).await.unwrap(), 3);
    // The delays of the list were waited: 10 ms, then 20 ms.
    assert!(started.elapsed() >= Duration::from_millis(30));
    let flow = home.flow("retrying");
    let run = home.task(flow.id, "flaky");
    assert_eq!((run.state, run.attempt), (Completed, 3));
    assert_eq!(
        home.history(run.id),
        [
            (Pending, 0),
            (Running, 1),
            (AwaitingRetry, 1),
            (Running, 2),
            (AwaitingRetry, 2),
            (Running, 3),
            (Completed, 3)
        ]
    );
    let states = home.store().states(run.id).await.unwrap();
    assert_eq!(
        states[2].message.as_deref(),
        Some("attempt 1 of 4 failed: attempt 1: connection reset; retrying in 10ms")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_when_spent_and_the_last_error_is_returned() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    #[task(retries = 2)]
    fn always_fails() -> anyhow::Result<()> {
        let n = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
        anyhow::bail!("failure {n}")
    }
    #[flow]
    async fn doomed() -> anyhow::Result<()> {
        always_fails().await
    }
    let home = support::home();
    let err = home.engine.scope(doomed()).await.unwrap_err();
    assert_eq!(err.to_string(), "failure 3");
    assert_eq!(CALLS.load(Ordering::SeqCst), 3);
    let run = home.task(home.flow("doomed").id, "always_fails");
    assert_eq!((run.state, run.attempt), (Failed, 3));
    assert_eq!(run.state_message.as_deref(), Some("failure 3"));
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error(transparent)]
    Kiln(#[from] kiln::Error),
}

fn is_transient(e: &FetchError) -> bool {
    matches!(e, FetchError::Status(s) if *s >= 500)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_if_decides_which_errors_are_retried() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    #[task(retries = 5, retry_if = is_transient)]
    async fn fetch(status: u16) -> Result<(), FetchError> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        Err(FetchError::Status(status))
    }
    #[flow]
    async fn fetching(status: u16) -> Result<(), FetchError> {
        fetch(status).await
    }
    let home = support::home();
    home.engine.scope(fetching(404)).await.unwrap_err();
    assert_eq!(CALLS.swap(0, Ordering::SeqCst), 1, "a 404 is not retried");
    home.engine.scope(fetching(503)).await.unwrap_err();
    assert_eq!(CALLS.swap(0, Ordering::SeqCst), 6, "a 503 is retried 5 times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_can_be_overridden_at_call_time() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    #[task(retries = 1)]
    async fn wobbly() -> anyhow::Result<u32> {
        let n = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
        anyhow::ensure!(n >= 4, "not yet ({n})");
        Ok(n)
    }
    #[flow]
    async fn patient() -> anyhow::Result<u32> {
        let more = wobbly.with_options(
            Options::new()
                .retries(5)
                .retry_delay(RetryDelay::exponential(Duration::ZERO)),
        );
        more.call().await
    }
    let home = support::home();
    assert_eq!(home.engine.scope(patient()).await.unwrap(), 4);
    let run = home.task(home.flow("patient").id, "wobbly");
    assert_eq!(run.attempt, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_attempt_ends_as_timed_out() {
    #[task(timeout = 0.05)]
    async fn sleepy() -> u32 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        1
    }
    #[flow]
    async fn impatient() -> Result<u32, kiln::Error> {
        sleepy().await
    }
    let home = support::home();
    let err = home.engine.scope(impatient()).await.unwrap_err();
    assert!(matches!(err, kiln::Error::TimedOut { .. }), "{err}");
    assert!(err.to_string().contains("timed out after 50ms"), "{err}");
    let flow = home.flow("impatient");
    assert_eq!(flow.state, Failed);
    let run = home.task(flow.id, "sleepy");
    assert_eq!(home.history(run.id), [(Pending, 0), (Running, 1), (TimedOut, 1)]);
    assert_eq!(run.state_message.as_deref(), Some("exceeded its timeout of 50ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_like_failures() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    #[task(timeout = "40ms", retries = 1)]
    async fn slow_then_fast() -> u32 {
        if CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        7
    }
    #[flow]
    async fn second_chance() -> Result<u32, kiln::Error> {
        slow_then_fast().await
    }
    let home = support::home();
    assert_eq!(home.engine.scope(second_chance()).await.unwrap(), 7);
    let run = home.task(home.flow("second_chance").id, "slow_then_fast");
    assert_eq!(
        home.history(run.id),
        [
            (Pending, 0),
            (Running, 1),
            (AwaitingRetry, 1),
            (Running, 2),
            (Completed, 2)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_crashes_without_taking_the_flow_down() {
    #[task]
    fn explode(x: u32) -> u32 {
        if x > 1 {
            panic!("value {x} out of range");
        }
        x
    }
    #[flow]
    async fn volatile() -> Result<(u32, bool), kiln::Error> {
        let ok = explode(1).await?;
        let crashed = explode(2).await;
        Ok((ok, matches!(crashed, Err(kiln::Error::Crashed { .. }))))
    }
    #[flow]
    fn fragile_flow() -> u32 {
        panic!("the flow itself gave up")
    }
    let home = support::home();
    assert_eq!(home.engine.scope(volatile()).await.unwrap(), (1, true));
    let err = home.engine.scope(fragile_flow()).await.unwrap_err().to_string();
    assert!(
        err.contains("flow run 'fragile_flow'") && err.contains("crashed: its body panicked: the flow itself gave up"),
        "a flow is not called a task: {err}"
    );
    let flow = home.flow("volatile");
    assert_eq!(flow.state, Completed);
    let runs = home.tasks(flow.id);
    assert_eq!(runs[1].state, Crashed);
    assert_eq!(runs[1].state_message.as_deref(), Some("panicked: value 2 out of range"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_that_are_not_clone_run_once() {
    struct Token;
    static CALLS: AtomicU32 = AtomicU32::new(0);
    #[task(retries = 3)]
    async fn consume(_t: Token) -> anyhow::Result<()> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        anyhow::bail!("no")
    }
    #[flow]
    async fn once() -> anyhow::Result<()> {
        consume(Token).await
    }
    let home = support::home();
    home.engine.scope(once()).await.unwrap_err();
    assert_eq!(CALLS.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_retry_reuses_a_result_only_for_the_same_inputs() {
    static ATTEMPT: AtomicU32 = AtomicU32::new(0);
    #[task]
    fn echo(x: u32) -> u32 {
        x
    }
    #[flow(retries = 1)]
    async fn changing() -> anyhow::Result<u32> {
        // The first attempt calls echo(10) and fails; the second calls echo(20).
        let first = ATTEMPT.fetch_add(1, Ordering::SeqCst) == 0;
        let value = echo(if first { 10 } else { 20 }).await?;
        anyhow::ensure!(!first, "the first attempt fails after its task");
        Ok(value)
    }
    let home = support::home();
    assert_eq!(home.engine.scope(changing()).await.unwrap(), 20);
    let flow = home.flow("changing");
    let states: Vec<_> = home.tasks(flow.id).iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [Completed, Completed],
        "echo(20) ran: no earlier call had its inputs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_are_matched_by_inputs_whatever_their_order() {
    static ATTEMPT: AtomicU32 = AtomicU32::new(0);
    #[task]
    async fn label(x: u32) -> String {
        format!("value {x}")
    }
    #[flow(retries = 1)]
    async fn fan() -> anyhow::Result<(String, String)> {
        // The second attempt submits the same two calls in the other order.
        let first = ATTEMPT.fetch_add(1, Ordering::SeqCst) == 0;
        let (one, two) = if first {
            let one = label.submit(1);
            (one, label.submit(2))
        } else {
            let two = label.submit(2);
            (label.submit(1), two)
        };
        let (one, two) = (one.await?, two.await?);
        anyhow::ensure!(!first, "the first attempt fails after its tasks");
        Ok((one, two))
    }
    let home = support::home();
    let (one, two) = home.engine.scope(fan()).await.unwrap();
    assert_eq!((one.as_str(), two.as_str()), ("value 1", "value 2"));
    let flow = home.flow("fan");
    let cached = home.tasks(flow.id).iter().filter(|t| t.state == Cached).count();
    assert_eq!(
        cached, 2,
        "both calls of the second attempt loaded their own earlier result"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_sync_attempt_never_overlaps_its_retry() {
    static ACTIVE: AtomicU32 = AtomicU32::new(0);
    static MOST: AtomicU32 = AtomicU32::new(0);
    static STARTED: AtomicU32 = AtomicU32::new(0);
    #[task(timeout = "50ms", retries = 1)]
    fn stubborn() -> u32 {
        // Ignores kiln::cancelled(): runs well past its timeout.
        let now = ACTIVE.fetch_add(1, Ordering::SeqCst) + 1;
        MOST.fetch_max(now, Ordering::SeqCst);
        let n = STARTED.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
        n
    }
    #[flow]
    async fn waiting() -> Result<u32, kiln::Error> {
        stubborn().await
    }
    let home = support::home();
    let err = home.engine.scope(waiting()).await.unwrap_err();
    assert!(matches!(err, kiln::Error::TimedOut { .. }), "{err}");
    assert_eq!(STARTED.load(Ordering::SeqCst), 2);
    assert_eq!(
        MOST.load(Ordering::SeqCst),
        1,
        "the retry started while the first body still ran"
    );
    let run = home.task(home.flow("waiting").id, "stubborn");
    let states = home.store().states(run.id).await.unwrap();
    let waited = states.iter().find(|s| s.state == AwaitingRetry).unwrap();
    let message = waited.message.as_deref().unwrap();
    assert!(
        message.contains("still running and was asked to stop") && message.contains("once its body has returned"),
        "{message}"
    );
    let last = states.last().unwrap();
    assert_eq!(last.state, TimedOut);
    assert!(last.message.as_deref().unwrap().contains("still running"), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_body_can_notice_its_timeout_and_stop() {
    static NOTICED: AtomicU32 = AtomicU32::new(0);
    #[task(timeout = "50ms")]
    fn cooperative() -> anyhow::Result<u32> {
        assert!(!kiln::cancelled(), "not cancelled before the timeout");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if kiln::cancelled() {
                NOTICED.fetch_add(1, Ordering::SeqCst);
                anyhow::bail!("stopped early");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(0)
    }
    #[flow]
    async fn polite() -> Result<(), kiln::Error> {
        cooperative()
            .await
            .map(|_| ())
            .map_err(|e| kiln::Error::Setup(e.to_string()))
    }
    let home = support::home();
    let err = home.engine.scope(polite()).await.unwrap_err();
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(!kiln::cancelled(), "outside any run nothing is cancelled");
    // The body saw the flag and returned, well before its 30 s loop would have ended.
    let deadline = Instant::now() + Duration::from_secs(20);
    while NOTICED.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(NOTICED.load(Ordering::SeqCst), 1);
}
