//! Confinement of plugin paths to the plugin directory. A path is resolved (relative paths
//! against the directory), refused if it has a `..` component, canonicalised (which follows
//! every symlink) and refused unless the result lies under the canonical directory.

use std::path::{Component, Path, PathBuf};

use super::HostError;

/// Resolves `path` inside `canonical_dir` (already canonical) and returns the canonical file
/// path, or why it is refused.
pub fn confine(path: &Path, canonical_dir: &Path) -> Result<PathBuf, HostError> {
    let refuse = |reason: String| HostError::OutsidePluginDir {
        path: path.to_path_buf(),
        dir: canonical_dir.to_path_buf(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(refuse("the path is empty".into()));
    }
    // `..` is refused outright even when it would land back inside: a config that needs it is
    // a mistake worth reporting.
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refuse("it contains a `..` component".into()));
    }
    let candidate = if path.is_absolute() {
        path.to_path_buf()
    } else {
        canonical_dir.join(path)
    };
    let canonical = candidate
        .canonicalize()
        .map_err(|source| HostError::NotFound {
            path: path.to_path_buf(),
            source,
        })?;
    if !canonical.starts_with(canonical_dir) {
        let how = if path.is_absolute() && !path.starts_with(canonical_dir) {
            "it is an absolute path outside the plugin directory".to_string()
        } else {
            format!("it resolves to {} (through a symlink)", canonical.display())
        };
        return Err(refuse(how));
    }
    if !canonical.is_file() {
        return Err(refuse(format!(
            "{} is not a regular file",
            canonical.display()
        )));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("plugins");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("libok.so"), b"x").unwrap();
        std::fs::write(root.path().join("libevil.so"), b"x").unwrap();
        let dir = dir.canonicalize().unwrap();
        let outside = root.path().join("libevil.so").canonicalize().unwrap();
        (root, dir, outside)
    }

    #[test]
    fn accepts_a_relative_name_and_an_absolute_path_inside() {
        let (_root, dir, _) = setup();
        let want = dir.join("libok.so");
        assert_eq!(confine(Path::new("libok.so"), &dir).unwrap(), want);
        assert_eq!(confine(&want, &dir).unwrap(), want);
    }

    #[test]
    fn refuses_parent_components_even_when_they_land_inside() {
        let (_root, dir, _) = setup();
        for p in ["../libevil.so", "../plugins/libok.so", "sub/../libok.so"] {
            let err = confine(Path::new(p), &dir).unwrap_err();
            assert!(err.to_string().contains("`..`"), "{p}: {err}");
        }
    }

    #[test]
    fn refuses_an_absolute_path_outside() {
        let (_root, dir, outside) = setup();
        let err = confine(&outside, &dir).unwrap_err();
        assert!(matches!(err, HostError::OutsidePluginDir { .. }), "{err}");
        assert!(err.to_string().contains("absolute path outside"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_symlink_leading_out_but_follows_one_staying_in() {
        let (_root, dir, outside) = setup();
        std::os::unix::fs::symlink(&outside, dir.join("liblink.so")).unwrap();
        let err = confine(Path::new("liblink.so"), &dir).unwrap_err();
        assert!(err.to_string().contains("through a symlink"), "{err}");
        std::os::unix::fs::symlink(dir.join("libok.so"), dir.join("libalias.so")).unwrap();
        assert_eq!(
            confine(Path::new("libalias.so"), &dir).unwrap(),
            dir.join("libok.so")
        );
    }

    #[test]
    fn reports_a_missing_file_and_refuses_a_directory() {
        let (_root, dir, _) = setup();
        let err = confine(Path::new("libnope.so"), &dir).unwrap_err();
        assert!(matches!(err, HostError::NotFound { .. }), "{err}");
        std::fs::create_dir(dir.join("sub")).unwrap();
        let err = confine(Path::new("sub"), &dir).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = confine(Path::new(""), &dir).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
