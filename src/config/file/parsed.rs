//! One manifest file as read: its stamp, its parsed version, and what of it stays in effect when
//! a later version fails.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::super::error::{ConfigError, Origin};
use super::super::load::{self, Object};

/// A file stamp younger than this is not trusted to tell versions apart: timestamps tick
/// coarsely, so a same-length rewrite within one tick of the last read would look unchanged.
/// Such files are read again (and compared by content) until they settle.
const SETTLE: Duration = Duration::from_secs(1);

/// One version of a file, identified without opening it (symlinks followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) len: u64,
    pub(super) mtime: (i64, i64),
    pub(super) ctime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    pub(super) fn settled(&self, now: SystemTime) -> bool {
        let (secs, nanos) = self.mtime.max(self.ctime);
        let changed = UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
        now.duration_since(changed).is_ok_and(|age| age >= SETTLE)
    }
}

/// A file as last parsed. Refused files are kept too, with their error.
pub(super) struct Parsed {
    pub(super) stamp: Stamp,
    /// The stamp was old enough to trust when read (see [`SETTLE`]).
    pub(super) settled: bool,
    pub(super) digest: [u8; 32],
    pub(super) objects: Vec<Object>,
    pub(super) errors: Vec<ConfigError>,
    /// Refused unparsed by the manifest limits (`errors` says why). A reload sets it aside and
    /// keeps `kept`, the objects of the last version of this file that loaded without error.
    pub(super) refused: bool,
    pub(super) kept: Vec<Object>,
    /// Read while being written (changed less than [`SETTLE`] ago, and so far empty or broken):
    /// the version before stays in effect, and the file is read again once it settles.
    pub(super) deferred: bool,
}

impl Parsed {
    /// A version some of whose documents fail, with the last good version of each failing one:
    /// the others take effect (a key rotated, an agent token deleted to revoke it, beside a typo
    /// in another document of the file). Where a failing document cannot be named (broken YAML
    /// ends the file; a document without a name), the whole last good version stays.
    pub(super) fn with_last_good(&self) -> Vec<Object> {
        let failed: Option<std::collections::HashSet<&str>> =
            self.errors.iter().map(|e| e.object.as_deref().filter(|o| o.contains('/'))).collect();
        let Some(failed) = failed else { return self.kept.clone() };
        let (labels, kept_labels): (Vec<String>, Vec<String>) =
            (self.objects.iter().map(Object::label).collect(), self.kept.iter().map(Object::label).collect());
        // A failing document parsed anyway (a TokenBudget kept to fail closed) yields to its last
        // good version, if there is one.
        let new =
            self.objects.iter().zip(&labels).filter(|(_, l)| !(failed.contains(l.as_str()) && kept_labels.contains(l)));
        let old = self.kept.iter().zip(&kept_labels).filter(|(_, l)| failed.contains(l.as_str()));
        new.chain(old).map(|(o, _)| o.clone()).collect()
    }

    /// What stays in effect if the next version of this file is refused, unreadable or does not
    /// parse: what this version put in effect, for the next version to keep where it fails: never the
    /// whole earlier version when only some documents failed here (a token deleted beside a typo
    /// must stay deleted when the next edit breaks the file).
    pub(super) fn last_good(self) -> Vec<Object> {
        if self.refused {
            self.kept
        } else if !self.errors.is_empty() && !self.kept.is_empty() {
            self.with_last_good()
        } else if !self.errors.is_empty() {
            self.kept
        } else {
            self.objects
        }
    }

    /// A file that could not be read: nothing of its own, its last good objects kept, and read
    /// again at the next reload (no stamp matches).
    pub(super) fn unreadable(kept: Vec<Object>, error: ConfigError) -> Parsed {
        let stamp = Stamp { dev: 0, ino: 0, len: 0, mtime: (0, 0), ctime: (0, 0) };
        Parsed {
            stamp,
            settled: false,
            digest: [0; 32],
            objects: Vec::new(),
            errors: vec![error],
            refused: false,
            kept,
            deferred: false,
        }
    }
}

/// The file as it is now: from the cache when its stamp is unchanged and was settled, else
/// read (at most [`load::MAX_MANIFEST_BYTES`]) and parsed unless its content is the cached one.
/// Unreadable: the error, and the cached version's last good objects (they stay).
pub(super) fn read_parsed(
    cached: Option<Parsed>,
    path: &Path,
    now: SystemTime,
) -> Result<Parsed, (Box<ConfigError>, Vec<Object>)> {
    let origin = Origin { file: path.to_path_buf(), document: 1 };
    if let Some(p) = &cached {
        if p.settled && std::fs::metadata(path).is_ok_and(|m| Stamp::of(&m) == p.stamp) {
            return Ok(cached.expect("checked"));
        }
    }
    let max = load::MAX_MANIFEST_BYTES;
    let read = || -> std::io::Result<(Stamp, String)> {
        let file = std::fs::File::open(path)?;
        let stamp = Stamp::of(&file.metadata()?);
        let mut text = String::new();
        if stamp.len <= max {
            file.take(max + 1).read_to_string(&mut text)?;
        }
        Ok((stamp, text))
    };
    let (stamp, text) = match read() {
        Ok(read) => read,
        Err(e) => {
            let last_good = cached.map(Parsed::last_good).unwrap_or_default();
            return Err((Box::new(ConfigError::new(format!("cannot read: {e}")).at(&origin)), last_good));
        }
    };
    let settled = stamp.settled(now);
    let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    if let Some(p) = cached.as_ref().filter(|p| p.digest == digest && !p.refused) {
        return Ok(Parsed {
            stamp,
            settled,
            digest,
            objects: p.objects.clone(),
            errors: p.errors.clone(),
            refused: false,
            kept: p.kept.clone(),
            deferred: false,
        });
    }
    let refusal = if stamp.len > max || text.len() as u64 > max {
        let len = stamp.len.max(text.len() as u64);
        Some(format!("{len} bytes is over the {max}-byte (1 MiB) limit for one manifest file; refused unread"))
    } else {
        load::prescan(&text).err()
    };
    if let Some(message) = refusal {
        let errors = vec![ConfigError::new(message).at(&origin)];
        let kept = cached.map(Parsed::last_good).unwrap_or_default();
        return Ok(Parsed {
            stamp,
            settled,
            digest,
            objects: Vec::new(),
            errors,
            refused: true,
            kept,
            deferred: false,
        });
    }
    let (objects, errors) = load::parse_file(path, &text);
    // Emptied or broken a moment ago: most likely still being written (`sops -d … > f.yaml`),
    // read because another file's change triggered this reload. Its writer's close, or the poll
    // once it has settled, reads it again.
    let in_effect = |p: &Parsed| !p.refused && (!p.objects.is_empty() || !p.kept.is_empty());
    if !settled && (objects.is_empty() || !errors.is_empty()) && cached.as_ref().is_some_and(in_effect) {
        tracing::debug!(file = %path.display(), "changed under a second ago and so far empty or broken; its last version stays until it settles");
        return Ok(Parsed { stamp, settled: false, deferred: true, ..cached.expect("checked") });
    }
    // What stays in effect where this version fails.
    let kept = if errors.is_empty() { Vec::new() } else { cached.map(Parsed::last_good).unwrap_or_default() };
    Ok(Parsed { stamp, settled, digest, objects, errors, refused: false, kept, deferred: false })
}
