//! Settings: `kiln.toml` (in the working directory, else in `$KILN_HOME`) and `KILN_*`
//! variables, which win over the file.
//!
//! | variable | `kiln.toml` | default | meaning |
//! |---|---|---|---|
//! | `KILN_HOME` | – | `~/.kiln` | state database, default local storages, `kiln.toml` |
//! | `KILN_API_URL` | `[api] url` | – | record and read through a Kiln server (`http://host:4200`) instead of a database (feature `api`) |
//! | `KILN_API_KEY` | – | – | the token for that server (environment only: it is a secret) |
//! | `KILN_DATABASE_URL` | `[database] url` | `sqlite://$KILN_HOME/kiln.db` | the state database: `sqlite://PATH`, or `postgres://...` (feature `postgres`) |
//! | `KILN_RESULTS_PERSIST_BY_DEFAULT` | `[results] persist_by_default` | `false` | persist every task's result |
//! | `KILN_DEFAULT_STORAGE` | `[results] default_storage` | `local` | storage of results that name none |
//! | `KILN_DEFAULT_SERIALIZER` | `[results] default_serializer` | `msgpack` | `msgpack` or `json` for serde values |
//! | `KILN_RESULTS_INLINE_MAX` | `[results] inline_max` | `4096` | bytes; records up to this size live in the state database, larger ones in a storage |
//! | `KILN_RESULTS_MEMORY_CACHE_MAX` | `[results] memory_cache_max` | `268435456` | bytes of loaded records kept in memory (LRU) |
//! | `KILN_RESULTS_FSYNC` | `[results] fsync` | `false` | flush each record of a `local` storage, and its folder, to the disk before its run completes |
//! | `KILN_TASKS_DEFAULT_CACHE_POLICY` | `[tasks] default_cache_policy` | `none` | cache policy of tasks that name none (`inputs`, `inputs+task_source`, ...) |
//! | `KILN_TASKS_REFRESH_CACHE` | `[tasks] refresh_cache` | `false` | run cached tasks anyway and overwrite their records |
//! | `KILN_LOG` | – | `info` | filter of Kiln's stderr output |
//! | `KILN_HEARTBEAT_SECONDS` | – | `10` | how often a process heartbeats; one silent for three beats counts as dead (its runs Crashed, a worker's claims taken back) |
//!
//! Storages are the `[storage.NAME]` tables (see [`crate::result::storage`]). A storage named
//! `local` always exists: a folder under `$KILN_HOME/storage/local` unless configured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;
use crate::result::StorageConfig;

/// Kiln's settings, as read from the file and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    home: PathBuf,
    file: PathBuf,
    storages: BTreeMap<String, StorageConfig>,
    /// Persist every task's result unless the task says otherwise.
    pub persist_by_default: bool,
    /// The storage of results whose task names none.
    pub default_storage: String,
    /// The serializer of serde values whose task names none (`msgpack` or `json`).
    pub default_serializer: String,
    /// Values encoded larger than this are never written into the database.
    pub inline_max: u64,
    /// Bytes of loaded records kept in memory for reuse (least recently used out).
    pub memory_cache_max: u64,
    /// A record in a `local` storage, and its folder, are flushed to the disk (fsync) before
    /// the write returns, so before its run's state says Completed: a power loss cannot then
    /// leave a completed run pointing at an empty record.
    pub fsync: bool,
    /// The cache policy of tasks that name none.
    pub default_cache_policy: crate::cache::CachePolicy,
    /// Run cached tasks anyway and overwrite their records.
    pub refresh_cache: bool,
    /// The state database's URL; `None`: the SQLite file `kiln.db` in the home folder.
    pub database_url: Option<String>,
    /// A Kiln server to record through instead of a database.
    pub api_url: Option<String>,
    /// The token for that server (`KILN_API_KEY`; from the environment only, never a file).
    pub api_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    results: ResultsSection,
    #[serde(default)]
    tasks: TasksSection,
    #[serde(default)]
    storage: BTreeMap<String, StorageConfig>,
    #[serde(default)]
    database: DatabaseSection,
    #[serde(default)]
    api: DatabaseSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseSection {
    url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksSection {
    default_cache_policy: Option<String>,
    refresh_cache: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultsSection {
    persist_by_default: Option<bool>,
    default_storage: Option<String>,
    default_serializer: Option<String>,
    inline_max: Option<u64>,
    memory_cache_max: Option<u64>,
    fsync: Option<bool>,
}

impl Settings {
    /// Reads `kiln.toml` from the working directory, else from `home`, and the environment.
    pub fn load(home: &Path) -> Result<Settings, Error> {
        let local = std::env::current_dir()
            .map(|d| d.join("kiln.toml"))
            .ok()
            .filter(|p| p.is_file());
        let file = local.unwrap_or_else(|| home.join("kiln.toml"));
        Settings::load_file(home, &file)
    }

    /// Reads settings from a given file (which may not exist yet) and the environment.
    pub fn load_file(home: &Path, file: &Path) -> Result<Settings, Error> {
        let parsed: File = match std::fs::read_to_string(file) {
            Ok(text) => {
                toml::from_str(&text).map_err(|e| Error::Setup(format!("{} is not valid: {e}", file.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(Error::Setup(format!("cannot read {}: {e}", file.display()))),
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let persist_by_default = match env("KILN_RESULTS_PERSIST_BY_DEFAULT") {
            Some(v) => parse_bool("KILN_RESULTS_PERSIST_BY_DEFAULT", &v)?,
            None => parsed.results.persist_by_default.unwrap_or(false),
        };
        let inline_max = match env("KILN_RESULTS_INLINE_MAX") {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| Error::Setup(format!("KILN_RESULTS_INLINE_MAX must be a number of bytes, not '{v}'")))?,
            None => parsed.results.inline_max.unwrap_or(4096),
        };
        let memory_cache_max = match env("KILN_RESULTS_MEMORY_CACHE_MAX") {
            Some(v) => v.trim().parse().map_err(|_| {
                Error::Setup(format!(
                    "KILN_RESULTS_MEMORY_CACHE_MAX must be a number of bytes, not '{v}'"
                ))
            })?,
            None => parsed.results.memory_cache_max.unwrap_or(256 * 1024 * 1024),
        };
        let fsync = match env("KILN_RESULTS_FSYNC") {
            Some(v) => parse_bool("KILN_RESULTS_FSYNC", &v)?,
            None => parsed.results.fsync.unwrap_or(false),
        };
        let default_cache_policy = match env("KILN_TASKS_DEFAULT_CACHE_POLICY").or(parsed.tasks.default_cache_policy) {
            Some(v) => crate::cache::CachePolicy::parse(&v)
                .map_err(|e| Error::Setup(format!("KILN_TASKS_DEFAULT_CACHE_POLICY: {e}")))?,
            None => crate::cache::CachePolicy::none(),
        };
        let refresh_cache = match env("KILN_TASKS_REFRESH_CACHE") {
            Some(v) => parse_bool("KILN_TASKS_REFRESH_CACHE", &v)?,
            None => parsed.tasks.refresh_cache.unwrap_or(false),
        };
        let default_serializer = env("KILN_DEFAULT_SERIALIZER")
            .or(parsed.results.default_serializer)
            .unwrap_or_else(|| "msgpack".into());
        if !["msgpack", "json"].contains(&default_serializer.as_str()) {
            return Err(Error::Setup(format!(
                "the default serializer '{default_serializer}' is not one Kiln can pick for any serde value; \
                 use msgpack or json (other serializers are named on the task: `serializer = ...`)"
            )));
        }
        Ok(Settings {
            home: home.to_owned(),
            file: file.to_owned(),
            storages: parsed.storage,
            persist_by_default,
            default_storage: env("KILN_DEFAULT_STORAGE")
                .or(parsed.results.default_storage)
                .unwrap_or_else(|| "local".into()),
            default_serializer,
            inline_max,
            memory_cache_max,
            fsync,
            default_cache_policy,
            refresh_cache,
            database_url: env("KILN_DATABASE_URL").or(parsed.database.url),
            api_url: env("KILN_API_URL").or(parsed.api.url),
            api_key: env("KILN_API_KEY"),
        })
    }

    /// Kiln's home folder.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The settings file (it may not exist yet).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// A storage's configuration; `local` exists even when not configured.
    pub fn storage(&self, name: &str) -> Option<StorageConfig> {
        self.storages
            .get(name)
            .cloned()
            .or_else(|| (name == "local").then_some(StorageConfig::Local { path: None }))
    }

    /// Every storage by name, `local` included.
    pub fn storages(&self) -> BTreeMap<String, StorageConfig> {
        let mut all = self.storages.clone();
        all.entry("local".into()).or_insert(StorageConfig::Local { path: None });
        all
    }

    /// Adds or replaces a storage and writes the settings file (its other content, comments
    /// and layout are kept). Refused: replacing the built-in `local` storage with another
    /// kind (every program falls back to it), and a local folder given as a relative path
    /// (it would mean another folder in every program started elsewhere).
    pub fn put_storage(&mut self, name: &str, config: StorageConfig) -> Result<(), Error> {
        check_storage(name, &config)?;
        let text = toml::to_string(&config).map_err(|e| Error::Setup(e.to_string()))?;
        let entry: toml_edit::DocumentMut = text.parse().map_err(|e| Error::Setup(format!("{e}")))?;
        self.edit_file(|doc| {
            let storage = doc
                .entry("storage")
                .or_insert_with(|| {
                    let mut t = toml_edit::Table::new();
                    t.set_implicit(true);
                    toml_edit::Item::Table(t)
                })
                .as_table_mut()
                .ok_or("[storage] is not a table")?;
            storage.insert(name, toml_edit::Item::Table(entry.as_table().clone()));
            Ok(())
        })?;
        self.storages.insert(name.to_owned(), config);
        Ok(())
    }

    /// Removes a storage from the settings file; `Ok(false)` when it was not there.
    pub fn remove_storage(&mut self, name: &str) -> Result<bool, Error> {
        if !self.storages.contains_key(name) {
            return Ok(false);
        }
        self.edit_file(|doc| {
            if let Some(t) = doc.get_mut("storage").and_then(toml_edit::Item::as_table_like_mut) {
                t.remove(name);
            }
            Ok(())
        })?;
        self.storages.remove(name);
        Ok(true)
    }

    /// Applies `edit` to the settings file, keeping what it does not touch as written
    /// (comments, order, layout).
    fn edit_file(&self, edit: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), String>) -> Result<(), Error> {
        let fail = |e: String| Error::Setup(format!("cannot update {}: {e}", self.file.display()));
        let mut doc: toml_edit::DocumentMut = match std::fs::read_to_string(&self.file) {
            Ok(text) => text.parse().map_err(|e: toml_edit::TomlError| fail(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml_edit::DocumentMut::new(),
            Err(e) => return Err(fail(e.to_string())),
        };
        edit(&mut doc).map_err(fail)?;
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        // Write beside, then rename: a crash never leaves a half-written settings file. It
        // may hold secrets (storage keys): only its owner may read it.
        let tmp = self.file.with_extension("toml.tmp");
        let text = doc.to_string();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&tmp)
            .and_then(|mut f| {
                use std::io::Write as _;
                f.write_all(text.as_bytes())
            })
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(|e| fail(e.to_string()))
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, Error> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::Setup(format!("{name} must be true or false, not '{v}'"))),
    }
}

/// Whether `config` may be saved as storage `name` (see [`Settings::put_storage`]): a valid
/// name, `local` left a local folder, a local folder given as an absolute path.
pub fn check_storage(name: &str, config: &StorageConfig) -> Result<(), Error> {
    check_name(name)?;
    if name == "local" && !matches!(config, StorageConfig::Local { .. }) {
        return Err(Error::Setup(format!(
            "the built-in storage 'local' stays a local folder (every program falls back to it); give this {} \
             storage another name",
            config.kind()
        )));
    }
    if let StorageConfig::Local { path: Some(path) } = config
        && !path.is_absolute()
    {
        return Err(Error::Setup(format!(
            "the folder of storage '{name}' must be an absolute path, not '{}' (a relative one would mean \
             another folder for every program started elsewhere)",
            path.display()
        )));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Setup(format!(
            "'{name}' is not a valid storage name: use letters, digits, '-' and '_' (at most 64)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storages_are_written_and_read_back_keeping_other_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        std::fs::write(&file, "[results]\ninline_max = 100\n").unwrap();
        let mut s = Settings::load_file(dir.path(), &file).unwrap();
        s.put_storage("lake", StorageConfig::Memory).unwrap();
        let again = Settings::load_file(dir.path(), &file).unwrap();
        assert_eq!(again.storage("lake"), Some(StorageConfig::Memory));
        assert_eq!(again.inline_max, 100);
        assert!(again.storages().contains_key("local"));
        let mut again = again;
        assert!(again.remove_storage("lake").unwrap());
        assert!(!again.remove_storage("lake").unwrap());
        assert_eq!(Settings::load_file(dir.path(), &file).unwrap().storage("lake"), None);
    }

    #[test]
    fn edits_keep_comments_and_layout_and_only_the_owner_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        let mine = "# my settings\n[results]   # results\ninline_max = 100 # bytes\n\n# the lake\n";
        std::fs::write(&file, mine).unwrap();
        let mut s = Settings::load_file(dir.path(), &file).unwrap();
        s.put_storage("lake", StorageConfig::Memory).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("# my settings\n[results]   # results\ninline_max = 100 # bytes\n"),
            "{text}"
        );
        assert!(text.contains("# the lake"), "{text}");
        assert!(text.contains("[storage.lake]\nkind = \"memory\""), "{text}");
        assert!(!text.contains("[storage]\n"), "no empty parent table: {text}");
        assert!(s.remove_storage("lake").unwrap());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), mine);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "it may hold secrets");
        }
    }

    #[test]
    fn fsync_is_off_unless_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        assert!(!Settings::load_file(dir.path(), &file).unwrap().fsync);
        std::fs::write(&file, "[results]\nfsync = true\n").unwrap();
        assert!(Settings::load_file(dir.path(), &file).unwrap().fsync);
    }

    #[test]
    fn foot_guns_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::load_file(dir.path(), &dir.path().join("kiln.toml")).unwrap();
        let err = s.put_storage("local", StorageConfig::Memory).unwrap_err().to_string();
        assert!(err.contains("stays a local folder"), "{err}");
        let relative = StorageConfig::Local {
            path: Some("results".into()),
        };
        let err = s.put_storage("archive", relative).unwrap_err().to_string();
        assert!(err.contains("must be an absolute path"), "{err}");
        assert!(!dir.path().join("kiln.toml").exists(), "nothing written");
        let absolute = StorageConfig::Local {
            path: Some(dir.path().join("archive")),
        };
        s.put_storage("local", absolute).unwrap();
    }

    #[test]
    fn bad_files_and_names_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        std::fs::write(&file, "[storage.x]\nkind = \"ftp\"\n").unwrap();
        let err = Settings::load_file(dir.path(), &file).unwrap_err().to_string();
        assert!(err.contains("kiln.toml is not valid") && err.contains("ftp"), "{err}");
        let mut ok = Settings::load_file(dir.path(), &dir.path().join("none.toml")).unwrap();
        assert!(ok.put_storage("../evil", StorageConfig::Memory).is_err());
    }
}
