//! The engine: which state store runs are recorded in, found from the environment.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use kiln_store::Store;
use kiln_store_sqlite::SqliteStore;

use crate::Error;
use crate::context;
use crate::result::{ResultError, ResultStorage, StorageConfig};
use crate::settings::Settings;

/// Where runs are recorded. Cheap to clone.
///
/// Flows and tasks use the engine of the scope they run in ([`Engine::scope`]) or, outside
/// any scope, the default one opened from the environment on first use
/// ([`Engine::from_env`]): the SQLite file `$KILN_HOME/kiln.db`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), kiln::Error> {
/// let home = tempfile::tempdir().unwrap();
/// let engine = kiln::Engine::open(home.path())?;
/// let flows = engine.scope(async { kiln::Engine::current().unwrap().store().flow_runs(10).await }).await?;
/// assert!(flows.is_empty());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    home: PathBuf,
    store: Arc<dyn Store>,
    settings: RwLock<Settings>,
    storages: Mutex<HashMap<String, ResultStorage>>,
    records: crate::result::cache::RecordCache,
    /// Read once: every task run consults them, and only storages change after opening.
    defaults: RunDefaults,
    /// This process's record and heartbeat in the store.
    liveness: crate::heartbeat::Liveness,
    /// Follows the task runs this process waits for on workers.
    watcher: crate::remote::Watcher,
}

/// The settings every run consults, without the settings lock.
struct RunDefaults {
    persist_by_default: bool,
    default_storage: Arc<str>,
    default_serializer: Arc<str>,
    /// `None` when the default policy does not cache.
    cache_policy: Option<Arc<crate::cache::CachePolicy>>,
    refresh_cache: bool,
    /// Records up to this size go into the state database instead of a storage.
    inline_max: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("home", &self.inner.home)
            .field("store", &self.inner.store)
            .finish()
    }
}

static DEFAULT: OnceLock<Result<Engine, Error>> = OnceLock::new();

impl Engine {
    /// Opens the state store of `home` with the settings found there: the database at
    /// `KILN_DATABASE_URL` (`[database] url`), else the embedded SQLite file `home/kiln.db`
    /// (created if missing).
    pub fn open(home: impl AsRef<Path>) -> Result<Engine, Error> {
        let home = home.as_ref().to_path_buf();
        let settings = Settings::load(&home)?;
        let store = match settings.api_url.as_deref() {
            Some(api) => open_api(api, settings.api_key.as_deref())?,
            None => open_store(&home, settings.database_url.as_deref())?,
        };
        Ok(Engine::with_store(settings, store))
    }

    /// An engine over any store (the seam for the server backend).
    pub fn with_store(settings: Settings, store: Arc<dyn Store>) -> Engine {
        crate::log::install_default_subscriber();
        let home = settings.home().to_path_buf();
        let liveness = crate::heartbeat::start(store.clone());
        Engine {
            inner: Arc::new(Inner {
                home,
                liveness,
                store,
                records: crate::result::cache::RecordCache::new(settings.memory_cache_max),
                defaults: RunDefaults {
                    persist_by_default: settings.persist_by_default,
                    default_storage: Arc::from(settings.default_storage.as_str()),
                    default_serializer: Arc::from(settings.default_serializer.as_str()),
                    cache_policy: (!settings.default_cache_policy.is_none())
                        .then(|| Arc::new(settings.default_cache_policy.clone())),
                    refresh_cache: settings.refresh_cache,
                    inline_max: settings.inline_max,
                },
                settings: RwLock::new(settings),
                storages: Mutex::new(HashMap::new()),
                watcher: Default::default(),
            }),
        }
    }

    /// Follows the task runs this process waits for on workers.
    pub(crate) fn watcher(&self) -> &crate::remote::Watcher {
        &self.inner.watcher
    }

    /// The id under which this process's runs are recorded (see [`crate::heartbeat`]).
    pub(crate) fn process_id(&self) -> uuid::Uuid {
        self.inner.liveness.process_id
    }

    pub(crate) fn record_cache(&self) -> &crate::result::cache::RecordCache {
        &self.inner.records
    }

    /// The settings in effect.
    pub fn settings(&self) -> Settings {
        self.inner.settings.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn persist_by_default(&self) -> bool {
        self.inner.defaults.persist_by_default
    }

    /// The default cache policy (`None`: no caching) and whether to refresh.
    pub(crate) fn cache_defaults(&self) -> (Option<&Arc<crate::cache::CachePolicy>>, bool) {
        (
            self.inner.defaults.cache_policy.as_ref(),
            self.inner.defaults.refresh_cache,
        )
    }

    pub(crate) fn inline_max(&self) -> u64 {
        self.inner.defaults.inline_max
    }

    pub(crate) fn default_storage(&self) -> Arc<str> {
        self.inner.defaults.default_storage.clone()
    }

    pub(crate) fn default_serializer(&self) -> &str {
        &self.inner.defaults.default_serializer
    }

    /// The storage named `name`, built on first use.
    pub fn storage(&self, name: &str) -> Result<ResultStorage, ResultError> {
        let mut built = self.inner.storages.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = built.get(name) {
            return Ok(s.clone());
        }
        let settings = self.inner.settings.read().unwrap_or_else(|p| p.into_inner());
        let config = settings.storage(name).ok_or_else(|| ResultError::UnknownStorage {
            name: name.to_owned(),
            known: settings.storages().into_keys().collect(),
        })?;
        let storage = ResultStorage::build(name, &config, &self.inner.home)?.with_fsync(settings.fsync);
        built.insert(name.to_owned(), storage.clone());
        Ok(storage)
    }

    /// Loads a persisted result, verifying its hash and that `serializer` wrote it.
    pub async fn load_result<T: Send + 'static>(
        &self,
        reference: &crate::result::ResultRef,
        serializer: impl crate::serializer::Serializer<T>,
    ) -> Result<T, ResultError> {
        crate::result::persist::load(self, reference, Arc::new(serializer), "Engine::load_result").await
    }

    /// Adds (or replaces) a storage and saves it in the settings file.
    pub fn put_storage(&self, name: &str, config: StorageConfig) -> Result<(), Error> {
        self.inner
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .put_storage(name, config)?;
        self.inner
            .storages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    /// Adds a storage unless one of that name exists; returns whether it was added.
    pub fn ensure_storage(&self, name: &str, config: StorageConfig) -> Result<bool, Error> {
        if self
            .inner
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .storage(name)
            .is_some()
        {
            return Ok(false);
        }
        self.put_storage(name, config)?;
        Ok(true)
    }

    /// Opens the embedded store in [`home_dir`].
    pub fn from_env() -> Result<Engine, Error> {
        Engine::open(home_dir()?)
    }

    /// The engine of the current scope, else the process-wide default from the environment.
    pub fn current() -> Result<Engine, Error> {
        if let Some(engine) = context::scoped_engine() {
            return Ok(engine);
        }
        DEFAULT.get_or_init(Engine::from_env).clone()
    }

    /// Runs `fut` with this engine as the current one (for flows and tasks started inside).
    pub async fn scope<F: IntoFuture>(&self, fut: F) -> F::Output {
        context::ENGINE.scope(self.clone(), fut.into_future()).await
    }

    /// The folder holding the database (and, later, local results).
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Waits until everything recorded so far has its outcome (durable, or reported to the
    /// run that wrote it).
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.inner.store.flush().await?)
    }
}

/// The file of a `sqlite://PATH` (or `sqlite:PATH`) URL.
fn sqlite_path(url: &str) -> Option<&str> {
    url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))
}

/// Opens the state store a URL names (as sqlx picks its driver): `sqlite://PATH` (or no URL:
/// `home/kiln.db`), `postgres://...` with the `postgres` feature.
pub fn open_store(home: &Path, url: Option<&str>) -> Result<Arc<dyn Store>, Error> {
    let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
        return Ok(Arc::new(SqliteStore::open(home.join("kiln.db"))?));
    };
    if let Some(path) = sqlite_path(url) {
        return Ok(Arc::new(SqliteStore::open(path)?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(kiln_store_postgres::PostgresStore::open(url)?));
        #[cfg(not(feature = "postgres"))]
        return Err(Error::Setup(
            "KILN_DATABASE_URL names a PostgreSQL database, but this build of Kiln has no PostgreSQL backend; \
             enable the `postgres` feature of the kiln crate"
                .into(),
        ));
    }
    let scheme = url.split(':').next().unwrap_or(url);
    Err(Error::Setup(format!(
        "KILN_DATABASE_URL has the scheme '{scheme}', which Kiln does not know; use sqlite://PATH or postgres://USER@HOST/DB"
    )))
}

/// The state store behind a Kiln server at `url` (`KILN_API_URL`), with token `key`
/// (`KILN_API_KEY`).
pub fn open_api(url: &str, key: Option<&str>) -> Result<Arc<dyn Store>, Error> {
    #[cfg(feature = "api")]
    return Ok(Arc::new(kiln_store_http::HttpStore::open_with_key(url, key)?));
    #[cfg(not(feature = "api"))]
    let _ = key;
    #[cfg(not(feature = "api"))]
    return Err(Error::Setup(format!(
        "KILN_API_URL is set ({url}), but this build of Kiln cannot talk to a server; enable the `api` feature of the kiln crate"
    )));
}

/// Opens an existing state store without creating or migrating it (the CLI's view):
/// writable when it can be (to mark the runs of dead processes Crashed), else read-only.
/// `Ok(None)`: the default SQLite file does not exist yet.
pub fn open_existing_store(home: &Path, url: Option<&str>) -> Result<Option<Arc<dyn Store>>, Error> {
    let path = match url.map(str::trim).filter(|u| !u.is_empty()) {
        None => home.join("kiln.db"),
        Some(url) => match sqlite_path(url) {
            Some(path) => PathBuf::from(path),
            None => return open_existing_server(url).map(Some),
        },
    };
    if !path.exists() {
        return Ok(None);
    }
    match SqliteStore::open_existing(&path) {
        Ok(store) => Ok(Some(Arc::new(store))),
        Err(kiln_store::StoreError::TooNew { target, found, known }) => {
            Err(kiln_store::StoreError::TooNew { target, found, known }.into())
        }
        // A home this user cannot write, or an older schema that only a flow may migrate.
        Err(_) => Ok(Some(Arc::new(SqliteStore::open_read_only(path)?))),
    }
}

fn open_existing_server(url: &str) -> Result<Arc<dyn Store>, Error> {
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(kiln_store_postgres::PostgresStore::open_existing(url)?));
    }
    open_store(Path::new("."), Some(url))
}

/// Kiln's home folder: `$KILN_HOME`, else `~/.kiln`.
pub fn home_dir() -> Result<PathBuf, Error> {
    if let Some(home) = std::env::var_os("KILN_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    std::env::home_dir()
        .filter(|h| !h.as_os_str().is_empty())
        .map(|h| h.join(".kiln"))
        .ok_or_else(|| Error::Setup("cannot find a home folder for Kiln's state; set KILN_HOME".into()))
}
