//! Durable runtime state (SPEC §5): what the operators decided, written
//! atomically before the admin API acknowledges it.
//!
//! [`StateStore`] is a trait so a shared store (etcd) can follow; today the
//! only implementation is [`FileStore`]: temporary file, fsync, rename, fsync
//! of the directory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::history::HistoryEntry;

/// Format version written in the file.
pub const STATE_VERSION: u32 = 1;

/// Everything that survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Always [`STATE_VERSION`].
    pub version: u32,
    /// Per-site state by site name.
    pub sites: BTreeMap<String, SiteState>,
}

impl State {
    /// What the file format cannot say but a saved state never holds: an
    /// empty live target, or weights that do not add up to 100.
    fn check(&self) -> Result<(), String> {
        for (name, site) in &self.sites {
            if site.live.is_empty() {
                return Err(format!("site {name:?}: live is empty"));
            }
            if let Some(w) = &site.weights {
                let sum: u32 = w.values().map(|&p| u32::from(p)).sum();
                if sum != 100 {
                    return Err(format!("site {name:?}: weights add up to {sum}, not 100"));
                }
            }
        }
        Ok(())
    }
}

/// What was decided for one site.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteState {
    /// The live target.
    pub live: String,
    /// The target live before, for rollback.
    pub previous: Option<String>,
    /// Targets created or replaced through the API.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetSpec>,
    /// Site modes.
    #[serde(default)]
    pub mode: ModeState,
    /// Canary weights, when set.
    #[serde(default)]
    pub weights: Option<BTreeMap<String, u8>>,
    /// Recorded actions, oldest first.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// The post-switch watch that was running: a restart resumes it for the
    /// time it has left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchState>,
    /// The site's newest deployments, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<crate::deployment::Deployment>,
}

/// A running post-switch watch, as saved with the switch that started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchState {
    /// The target watched: the one the switch made live.
    pub target: String,
    /// The target an automatic rollback returns to.
    pub previous: String,
    /// When the watch started (RFC 3339).
    pub started_at: String,
    /// How long it lasts in all.
    #[serde(with = "humantime_serde")]
    pub duration: std::time::Duration,
}

impl WatchState {
    /// How long the watch has left at `now`: `None` once it is over, or when
    /// its start cannot be read.
    pub fn left_at(&self, now: SystemTime) -> Option<std::time::Duration> {
        let started = humantime::parse_rfc3339(&self.started_at).ok()?;
        let end = started.checked_add(self.duration)?;
        end.duration_since(now).ok().filter(|left| !left.is_zero())
    }
}

/// A target set through the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// `host:port` endpoints.
    pub endpoints: Vec<String>,
    /// Declared version.
    pub version: Option<String>,
    /// The configuration defined this target (when it was set, or at a start
    /// or reload since): it goes when the configuration drops it. A target
    /// only the API ever defined stays.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub configured: bool,
}

/// Durable site modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeState {
    /// Writes refused.
    #[serde(default)]
    pub read_only: bool,
    /// Everything answered with the maintenance page.
    #[serde(default)]
    pub maintenance: bool,
    /// While the site is paused: how long each request is held at most.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub paused: Option<std::time::Duration>,
}

/// A state file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The fault.
        source: io::Error,
    },
    /// The file exists but cannot be read (a directory, no permission).
    #[error("state file {path} cannot be read: {fault} (fix it, or start with --reset-state to move it aside)")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The fault (in the message, not a source: it would be printed twice).
        fault: io::Error,
    },
    /// The file is not a valid state file.
    #[error("state file {path} is not valid: {message} (fix it, or start with --reset-state to move it aside)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The fault.
        message: String,
    },
}

/// Where state is kept.
pub trait StateStore: Send + Sync + 'static {
    /// The last saved state, `None` when nothing was ever saved.
    fn load(&self) -> Result<Option<State>, StateError>;
    /// Saves `state` durably; returns only once it would survive a crash.
    fn save(&self, state: &State) -> Result<(), StateError>;
}

/// A JSON state file written atomically.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    /// `<state file>.lock`, locked for as long as the store lives (see [`FileStore::open`]).
    _lock: Option<std::sync::Arc<File>>,
}

impl FileStore {
    /// A store at `path`, taken without a lock (tests, tools).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), _lock: None }
    }

    /// The store a running proxy uses: its directory must exist, and no other
    /// process may use the same file (`<file>.lock` is locked until exit; the
    /// kernel drops the lock when the process dies, even by `kill -9`).
    /// Temporary files a crashed save left behind are removed.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StateError> {
        let path: PathBuf = path.into();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let io = |source: io::Error| StateError::Io { path: path.clone(), source };
        if !dir.is_dir() {
            let message = format!("its directory {} does not exist", dir.display());
            return Err(io(io::Error::new(io::ErrorKind::NotFound, message)));
        }
        let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
        lock_name.push(".lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(&lock_name)).map_err(io)?;
        if let Err(e) = lock.try_lock() {
            let message = match e {
                fs::TryLockError::WouldBlock => {
                    format!("in use by another cutover ({} is locked)", dir.join(&lock_name).display())
                }
                fs::TryLockError::Error(e) => format!("cannot lock {}: {e}", dir.join(&lock_name).display()),
            };
            return Err(io(io::Error::new(io::ErrorKind::WouldBlock, message)));
        }
        let mut stale = path.file_name().unwrap_or_default().to_os_string();
        stale.push(".tmp-");
        let stale = stale.to_string_lossy().into_owned();
        for entry in fs::read_dir(&dir).map_err(io)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&stale) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { path, _lock: Some(std::sync::Arc::new(lock)) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves an existing state file aside (`<name>.reset-<unix time>`); returns the new name.
    pub fn reset(&self) -> Result<Option<PathBuf>, StateError> {
        if !self.path.exists() {
            return Ok(None);
        }
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut aside = self.path.clone().into_os_string();
        aside.push(format!(".reset-{secs}"));
        let aside = PathBuf::from(aside);
        fs::rename(&self.path, &aside).map_err(|source| StateError::Io { path: self.path.clone(), source })?;
        Ok(Some(aside))
    }

    fn io(&self, source: io::Error) -> StateError {
        StateError::Io { path: self.path.clone(), source }
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<State>, StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(fault) => return Err(StateError::Unreadable { path: self.path.clone(), fault }),
        };
        let corrupt = |message: String| StateError::Corrupt { path: self.path.clone(), message };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        // serde also reads a struct from an array of its fields (`[1, {"shop": ["green", null]}]`):
        // a file of another shape than the one cutover writes is not a state file.
        let read: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let written = serde_json::to_value(&state).map_err(|e| corrupt(e.to_string()))?;
        if let Some(at) = array_for_object(&read, &written, String::new()) {
            let at = if at.is_empty() { "the file".to_string() } else { at };
            return Err(corrupt(format!("{at} is an array, not an object")));
        }
        // A name twice in one object (two `shop` sites, two `green` targets or weights): serde keeps
        // the last silently, so a hand-edited file would start with one of two decisions unsaid.
        serde_json::from_slice::<UniqueKeys>(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(corrupt(format!("unsupported version {} (expected {STATE_VERSION})", state.version)));
        }
        state.check().map_err(corrupt)?;
        Ok(Some(state))
    }

    fn save(&self, state: &State) -> Result<(), StateError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| StateError::Corrupt { path: self.path.clone(), message: e.to_string() })?;
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tmp_name = self.path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| self.io(e))
    }
}

/// Any JSON document whose objects name no key twice (see [`FileStore::load`]).
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if keys.contains(&key) {
                return Err(serde::de::Error::custom(format!("{key:?} is named twice in one object")));
            }
            map.next_value::<UniqueKeys>()?;
            keys.insert(key);
        }
        Ok(self)
    }
}

/// Where `read` has an array in place of an object `written` has (the
/// path, `""` for the top), when anywhere.
fn array_for_object(read: &serde_json::Value, written: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    match (read, written) {
        (Value::Array(_), Value::Object(_)) => Some(at),
        (Value::Object(r), Value::Object(w)) => {
            let field = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
            w.iter().find_map(|(k, wv)| array_for_object(r.get(k)?, wv, field(k)))
        }
        (Value::Array(r), Value::Array(w)) => {
            r.iter().zip(w).enumerate().find_map(|(i, (rv, wv))| array_for_object(rv, wv, format!("{at}[{i}]")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        assert_eq!(store.load().unwrap(), None);
        let mut state = State { version: STATE_VERSION, ..Default::default() };
        state.sites.insert("shop".into(), SiteState { live: "green".into(), ..Default::default() });
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"{not json").unwrap();
        let err = FileStore::new(&path).load().unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn weights_not_adding_up_to_100_and_an_empty_live_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for (site, fault) in [
            (r#"{"live":"blue","previous":null,"weights":{"blue":60,"green":30}}"#, "weights add up to 90, not 100"),
            (r#"{"live":"","previous":null}"#, "live is empty"),
        ] {
            fs::write(&path, format!(r#"{{"version":1,"sites":{{"shop":{site}}}}}"#)).unwrap();
            let err = FileStore::new(&path).load().unwrap_err().to_string();
            assert!(err.contains(&format!("site \"shop\": {fault}")) && err.contains("--reset-state"), "{err}");
        }
    }

    #[test]
    fn a_struct_written_as_an_array_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for (file, at) in [
            (r#"[1,{}]"#, "the file"),
            (r#"{"version":1,"sites":{"shop":["blue",null]}}"#, "sites.shop"),
            (r#"{"version":1,"sites":{"shop":{"live":"blue","previous":null,"mode":[true]}}}"#, "sites.shop.mode"),
        ] {
            fs::write(&path, file).unwrap();
            let err = FileStore::new(&path).load().unwrap_err().to_string();
            assert!(err.contains(&format!("{at} is an array, not an object")), "{file}: {err}");
        }
    }

    #[test]
    fn a_name_twice_in_one_object_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for (file, name) in [
            (
                r#"{"version":1,"sites":{"shop":{"live":"green","previous":null},"shop":{"live":"blue","previous":null}}}"#,
                "shop",
            ),
            (
                r#"{"version":1,"sites":{"shop":{"live":"blue","previous":null,"weights":{"blue":50,"green":50,"green":50}}}}"#,
                "green",
            ),
        ] {
            fs::write(&path, file).unwrap();
            let err = FileStore::new(&path).load().unwrap_err().to_string();
            assert!(err.contains(&format!("{name:?} is named twice in one object")), "{file}: {err}");
        }
        // The same name in different objects is fine.
        fs::write(&path, r#"{"version":1,"sites":{"blue":{"live":"blue","previous":"blue"}}}"#).unwrap();
        assert!(FileStore::new(&path).load().unwrap().is_some());
    }

    #[test]
    fn a_directory_in_place_of_the_file_is_unreadable_with_the_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::create_dir(&path).unwrap();
        let err = FileStore::new(&path).load().unwrap_err();
        // The fault is said once: in the message, with no source to print after it.
        assert!(std::error::Error::source(&err).is_none());
        let err = err.to_string();
        assert!(err.contains("cannot be read") && err.contains("--reset-state"), "{err}");
        let aside = FileStore::new(&path).reset().unwrap().unwrap();
        assert!(aside.is_dir() && !path.exists());
    }

    #[test]
    fn reset_moves_the_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"garbage").unwrap();
        let store = FileStore::new(&path);
        let aside = store.reset().unwrap().unwrap();
        assert!(!path.exists());
        assert_eq!(fs::read(aside).unwrap(), b"garbage");
        assert_eq!(store.load().unwrap(), None);
    }
}
