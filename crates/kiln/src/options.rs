//! Run options shared by tasks and flows: name, retries, retry delays, timeout, tags.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::CachePolicy;

/// How long to wait before a retry.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RetryDelay {
    /// Retry at once.
    None,
    /// The same delay before every retry.
    Fixed(Duration),
    /// The n-th retry waits the n-th delay; the last one repeats.
    List(Vec<Duration>),
    /// `base * 2^(n-1)`, capped at `max`, then spread by up to `jitter` (a fraction) either way.
    Exponential {
        /// The first delay.
        base: Duration,
        /// The longest delay.
        max: Duration,
        /// Relative random spread, from 0 to 1 (0.2 = ±20%).
        jitter: f64,
    },
}

impl RetryDelay {
    /// `base * 2^(n-1)` capped at ten minutes, with ±20% jitter.
    pub fn exponential(base: Duration) -> Self {
        RetryDelay::Exponential {
            base,
            max: Duration::from_secs(600),
            jitter: 0.2,
        }
    }

    /// The delay before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let retry = retry.max(1);
        match self {
            RetryDelay::None => Duration::ZERO,
            RetryDelay::Fixed(d) => *d,
            RetryDelay::List(list) => list
                .get(retry as usize - 1)
                .or(list.last())
                .copied()
                .unwrap_or_default(),
            RetryDelay::Exponential { base, max, jitter } => {
                let factor = 2f64.powi(retry.saturating_sub(1).min(62) as i32);
                let raw = (base.as_secs_f64() * factor).min(max.as_secs_f64());
                let spread = jitter.clamp(0.0, 1.0) * (fastrand::f64() * 2.0 - 1.0);
                Duration::from_secs_f64((raw * (1.0 + spread)).max(0.0))
            }
        }
    }
}

/// A predicate deciding whether an error is worth a retry.
pub type RetryIf<E> = Arc<dyn Fn(&E) -> bool + Send + Sync>;

/// Options of a task or a flow.
///
/// `#[task(...)]` and `#[flow(...)]` set the defaults; [`with_options`](crate::Task) on a task
/// or flow overrides the fields that are set here, field by field.
///
/// ```
/// use std::time::Duration;
/// use kiln::{Options, RetryDelay};
///
/// let opts: Options<anyhow::Error> = Options::new()
///     .retries(3)
///     .retry_delay(RetryDelay::exponential(Duration::from_millis(100)))
///     .retry_if(|e: &anyhow::Error| e.to_string().contains("temporarily"))
///     .timeout(Duration::from_secs(30))
///     .tags(["nightly"]);
/// assert_eq!(opts.max_attempts(), 4);
/// ```
pub struct Options<E = anyhow::Error> {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) retries: Option<u32>,
    pub(crate) retry_delay: Option<RetryDelay>,
    pub(crate) retry_if: Option<RetryIf<E>>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) tags: Option<Arc<[String]>>,
    pub(crate) persist: Option<bool>,
    pub(crate) storage: Option<Arc<str>>,
    pub(crate) storage_key: Option<Arc<str>>,
    pub(crate) cache: Option<Arc<CachePolicy>>,
    pub(crate) cache_expiration: Option<Duration>,
    pub(crate) refresh_cache: Option<bool>,
    pub(crate) isolation: Option<crate::Isolation>,
    pub(crate) on_commit: Option<crate::TransactionHook>,
    pub(crate) on_rollback: Option<crate::TransactionHook>,
    pub(crate) cache_skip_unhashable: Option<bool>,
    pub(crate) pool: Option<Arc<str>>,
}

impl<E> Options<E> {
    /// No options set: every field falls back to the defaults.
    pub fn new() -> Self {
        Options {
            name: None,
            retries: None,
            retry_delay: None,
            retry_if: None,
            timeout: None,
            tags: None,
            persist: None,
            storage: None,
            storage_key: None,
            cache: None,
            cache_expiration: None,
            refresh_cache: None,
            isolation: None,
            on_commit: None,
            on_rollback: None,
            cache_skip_unhashable: None,
            pool: None,
        }
    }

    /// The run's name (defaults to the function's name).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How many times a failed attempt is retried (default 0).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    /// The wait before each retry (default none).
    pub fn retry_delay(mut self, delay: RetryDelay) -> Self {
        self.retry_delay = Some(delay);
        self
    }

    /// Retry only errors for which `predicate` is true (default: every error).
    pub fn retry_if(mut self, predicate: impl Fn(&E) -> bool + Send + Sync + 'static) -> Self {
        self.retry_if = Some(Arc::new(predicate));
        self
    }

    /// The longest an attempt may run; it then ends as TimedOut (default none).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Tags recorded with the run.
    pub fn tags<S: Into<String>>(mut self, tags: impl IntoIterator<Item = S>) -> Self {
        self.tags = Some(tags.into_iter().map(Into::into).collect());
        self
    }

    /// Whether to persist the result (default: `KILN_RESULTS_PERSIST_BY_DEFAULT`, or on when
    /// a storage is named).
    pub fn persist(mut self, persist: bool) -> Self {
        self.persist = Some(persist);
        self
    }

    /// The storage persisted results go to (default: `KILN_DEFAULT_STORAGE`, else `local`).
    /// Naming a storage turns persistence on unless `persist(false)` says otherwise.
    pub fn storage(mut self, name: impl Into<Arc<str>>) -> Self {
        self.storage = Some(name.into());
        self
    }

    /// Run the task on a worker serving this work pool (`kiln::serve().pool("gpu")`), in
    /// another process or on another machine: its inputs and its result cross as records in
    /// its storage, which both must reach (not `memory`; a `local` folder pins the run to
    /// workers on this host).
    pub fn pool(mut self, pool: impl Into<Arc<str>>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// The key template of persisted results, e.g. `"images/{flow_run.id}/{parameters.name}.png"`.
    /// Fields: `run.id`, `run.name`, `flow_run.id`, `flow_run.name`, `parameters.<name>`.
    pub fn storage_key(mut self, template: impl Into<Arc<str>>) -> Self {
        self.storage_key = Some(template.into());
        self
    }

    /// The cache policy (default: `KILN_TASKS_DEFAULT_CACHE_POLICY`, else none). Caching
    /// turns persistence on: the cache key is the result's storage key.
    pub fn cache(mut self, policy: CachePolicy) -> Self {
        self.cache = Some(Arc::new(policy));
        self
    }

    /// How long a cached record counts (default: for ever).
    pub fn cache_expiration(mut self, expiration: Duration) -> Self {
        self.cache_expiration = Some(expiration);
        self
    }

    /// Run even on a cache hit, and overwrite the record (default: `KILN_TASKS_REFRESH_CACHE`).
    pub fn refresh_cache(mut self, refresh: bool) -> Self {
        self.refresh_cache = Some(refresh);
        self
    }

    /// How concurrent runs that miss the same cache key behave (default: all run).
    pub fn isolation(mut self, isolation: crate::Isolation) -> Self {
        self.isolation = Some(isolation);
        self
    }

    /// When an input cannot be hashed for the cache key: run without caching and warn
    /// (`true`), instead of failing the run (the default).
    pub fn cache_skip_unhashable(mut self, skip: bool) -> Self {
        self.cache_skip_unhashable = Some(skip);
        self
    }

    /// Runs after the transaction this task run is in commits.
    pub fn on_commit(mut self, hook: crate::TransactionHook) -> Self {
        self.on_commit = Some(hook);
        self
    }

    /// Runs when the transaction this task run succeeded in rolls back: undo side effects.
    pub fn on_rollback(mut self, hook: crate::TransactionHook) -> Self {
        self.on_rollback = Some(hook);
        self
    }

    /// Attempts in all: one plus the retries.
    pub fn max_attempts(&self) -> u32 {
        self.retries.unwrap_or(0).saturating_add(1)
    }

    /// These options where set, `base` elsewhere.
    pub fn over(self, base: &Options<E>) -> Options<E> {
        Options {
            name: self.name.or_else(|| base.name.clone()),
            retries: self.retries.or(base.retries),
            retry_delay: self.retry_delay.or_else(|| base.retry_delay.clone()),
            retry_if: self.retry_if.or_else(|| base.retry_if.clone()),
            timeout: self.timeout.or(base.timeout),
            tags: self.tags.or_else(|| base.tags.clone()),
            persist: self.persist.or(base.persist),
            storage: self.storage.or_else(|| base.storage.clone()),
            storage_key: self.storage_key.or_else(|| base.storage_key.clone()),
            cache: self.cache.or_else(|| base.cache.clone()),
            cache_expiration: self.cache_expiration.or(base.cache_expiration),
            refresh_cache: self.refresh_cache.or(base.refresh_cache),
            isolation: self.isolation.or(base.isolation),
            on_commit: self.on_commit.or(base.on_commit),
            on_rollback: self.on_rollback.or(base.on_rollback),
            cache_skip_unhashable: self.cache_skip_unhashable.or(base.cache_skip_unhashable),
            pool: self.pool.or_else(|| base.pool.clone()),
        }
    }

    pub(crate) fn delay_before(&self, retry: u32) -> Duration {
        self.retry_delay.as_ref().map_or(Duration::ZERO, |d| d.delay(retry))
    }

    pub(crate) fn should_retry(&self, error: &E) -> bool {
        self.retry_if.as_ref().is_none_or(|p| p(error))
    }

    pub(crate) fn tag_list(&self) -> Vec<String> {
        self.tags.as_deref().map(<[String]>::to_vec).unwrap_or_default()
    }
}

impl<E> Default for Options<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> Clone for Options<E> {
    fn clone(&self) -> Self {
        Options {
            name: self.name.clone(),
            retries: self.retries,
            retry_delay: self.retry_delay.clone(),
            retry_if: self.retry_if.clone(),
            timeout: self.timeout,
            tags: self.tags.clone(),
            persist: self.persist,
            storage: self.storage.clone(),
            storage_key: self.storage_key.clone(),
            cache: self.cache.clone(),
            cache_expiration: self.cache_expiration,
            refresh_cache: self.refresh_cache,
            isolation: self.isolation,
            on_commit: self.on_commit,
            on_rollback: self.on_rollback,
            cache_skip_unhashable: self.cache_skip_unhashable,
            pool: self.pool.clone(),
        }
    }
}

impl<E> fmt::Debug for Options<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("name", &self.name)
            .field("retries", &self.retries)
            .field("retry_delay", &self.retry_delay)
            .field("retry_if", &self.retry_if.as_ref().map(|_| "<predicate>"))
            .field("timeout", &self.timeout)
            .field("tags", &self.tags)
            .field("persist", &self.persist)
            .field("storage", &self.storage)
            .field("storage_key", &self.storage_key)
            .field("cache", &self.cache)
            .field("cache_expiration", &self.cache_expiration)
            .field("refresh_cache", &self.refresh_cache)
            .field("isolation", &self.isolation)
            .field("on_commit", &self.on_commit.map(|_| "<hook>"))
            .field("on_rollback", &self.on_rollback.map(|_| "<hook>"))
            .field("cache_skip_unhashable", &self.cache_skip_unhashable)
            .field("pool", &self.pool)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_their_schedule() {
        let ms = Duration::from_millis;
        assert_eq!(RetryDelay::Fixed(ms(5)).delay(3), ms(5));
        let list = RetryDelay::List(vec![ms(1), ms(2), ms(4)]);
        assert_eq!([1, 2, 3, 9].map(|n| list.delay(n)), [ms(1), ms(2), ms(4), ms(4)]);
        let exp = RetryDelay::Exponential {
            base: ms(100),
            max: ms(350),
            jitter: 0.0,
        };
        assert_eq!([1, 2, 3, 4].map(|n| exp.delay(n)), [ms(100), ms(200), ms(350), ms(350)]);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let exp = RetryDelay::Exponential {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.5,
        };
        for _ in 0..200 {
            let d = exp.delay(2).as_secs_f64();
            assert!((1.0..=3.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn overrides_apply_field_by_field() {
        let base: Options<()> = Options::new().retries(2).timeout(Duration::from_secs(1)).tags(["a"]);
        let merged = Options::new().retries(5).over(&base);
        assert_eq!(merged.retries, Some(5));
        assert_eq!(merged.timeout, Some(Duration::from_secs(1)));
        assert_eq!(merged.tag_list(), vec!["a".to_string()]);
    }
}
