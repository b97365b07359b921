//! Finding a system's rpm database under its root without ever leaving the root.

use std::path::{Component, Path, PathBuf};

use crate::{
    DbError,
    confine::{Dir, Root},
};

/// Where rpm keeps its database, in the order rpm's own configuration prefers.
const CANDIDATES: &[&str] = &["usr/lib/sysimage/rpm", "var/lib/rpm", "usr/share/rpm"];
const MAX_LINKS: usize = 40;

/// Resolves `relative` inside `root`, following symlinks as if `root` were `/`: an absolute
/// link target restarts from the root, `..` never climbs above it. Returns the resolved path
/// (under `root`) when it exists.
pub fn resolve_in_root(root: &Path, relative: &Path) -> Option<PathBuf> {
    let mut done: Vec<std::ffi::OsString> = Vec::new();
    let mut todo: Vec<std::ffi::OsString> = relative
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop();
            continue;
        }
        let candidate = done
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&part);
        let meta = std::fs::symlink_metadata(&candidate).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return None;
            }
            let target = std::fs::read_link(&candidate).ok()?;
            if target.is_absolute() {
                done.clear();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(p) => todo.push(p.to_owned()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        } else {
            done.push(part);
        }
    }
    Some(done.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// The rpm database directory of the system at `root`, as a path under `root` (for watching
/// it); reading goes through [`crate::read_with`] with [`crate::Source::Root`].
pub fn locate(root: &Path) -> Result<PathBuf, DbError> {
    let (dir, _) = locate_in(&open_root(root)?)?;
    Ok(dir.path().to_path_buf())
}

/// The root, opened; a root that does not exist holds no database.
pub(crate) fn open_root(root: &Path) -> Result<Root, DbError> {
    Root::open(root).map_err(|e| match e {
        DbError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            DbError::NotFound {
                path: root.to_path_buf(),
            }
        }
        other => other,
    })
}

/// The first candidate directory, resolved inside `root`, that holds a database file (an
/// entry by one of rpm's names, of any kind), and that file's name.
pub(crate) fn locate_in(root: &Root) -> Result<(Dir, &'static str), DbError> {
    for candidate in CANDIDATES {
        // A candidate that is missing, not a directory or a link loop is no database.
        let Ok(dir) = root.open_dir(Path::new(candidate)) else {
            continue;
        };
        if let Some(name) = crate::database_in(&dir)? {
            return Ok((dir, name));
        }
    }
    Err(DbError::NotFound {
        path: root.path().to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_links_inside_the_root_only() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/lib/sysimage/rpm")).unwrap();
        std::fs::write(r.join("usr/lib/sysimage/rpm/rpmdb.sqlite"), b"x").unwrap();
        std::fs::create_dir_all(r.join("var/lib")).unwrap();
        // An absolute link: resolved against the root, not the host.
        std::os::unix::fs::symlink("/usr/lib/sysimage/rpm", r.join("var/lib/rpm")).unwrap();
        assert_eq!(
            resolve_in_root(r, Path::new("var/lib/rpm")),
            Some(r.join("usr/lib/sysimage/rpm"))
        );
        // `..` cannot climb out.
        std::os::unix::fs::symlink("../../../../../../etc", r.join("var/lib/escape")).unwrap();
        assert_eq!(
            resolve_in_root(r, Path::new("var/lib/escape")),
            None,
            "no etc under the root"
        );
        std::os::unix::fs::symlink("/etc", r.join("var/lib/abs-escape")).unwrap();
        assert_eq!(resolve_in_root(r, Path::new("var/lib/abs-escape")), None);
        // Loops end.
        std::os::unix::fs::symlink("loop", r.join("var/lib/loop")).unwrap();
        assert_eq!(resolve_in_root(r, Path::new("var/lib/loop")), None);
        assert_eq!(locate(r).unwrap(), r.join("usr/lib/sysimage/rpm"));
    }

    #[test]
    fn finds_nothing_in_an_empty_root() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(locate(root.path()), Err(DbError::NotFound { .. })));
    }
}
