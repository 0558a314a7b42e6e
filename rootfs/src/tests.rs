//! Layers built here, as an attacker or a real image would write them, applied to a
//! temporary root. The node unpacks as root, and so do these tests (ownership).

use super::*;

/// A tar built entry by entry, with names written raw (the tar crate refuses `..`).
#[derive(Default)]
struct Tar {
    b: Vec<(tar::Header, Vec<u8>)>,
}

impl Tar {
    fn entry(
        mut self,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        data: &[u8],
        mode: u32,
    ) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.b.push((h, data.to_vec()));
        self
    }
    fn dir(self, name: &str) -> Self {
        self.entry(tar::EntryType::Directory, name, "", b"", 0o755)
    }
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(tar::EntryType::Regular, name, "", data, 0o644)
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(tar::EntryType::Symlink, name, target, b"", 0o777)
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(tar::EntryType::Link, name, target, b"", 0o644)
    }
    fn bytes(self) -> Vec<u8> {
        let mut out = tar::Builder::new(Vec::new());
        for (h, data) in &self.b {
            out.append(h, data.as_slice()).unwrap();
        }
        out.into_inner().unwrap()
    }
}

/// A root to unpack into, and a directory beside it that must stay empty.
struct Scene {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn scene() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    Scene {
        root,
        outside,
        _dir: dir,
    }
}

impl Scene {
    fn apply(&self, tar: Tar) -> Result<Stats, RootfsError> {
        unpack_layer(
            &self.root,
            &tar.bytes()[..],
            Compression::None,
            Limits::default(),
        )
    }
    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }
    fn assert_outside_untouched(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "written outside the root: {left:?}");
    }
    /// The outside directory's absolute path without its leading `/`: where an absolute
    /// symlink to it lands inside the root.
    fn outside_in_root(&self) -> PathBuf {
        self.root.join(self.outside.strip_prefix("/").unwrap())
    }
}

#[test]
fn files_directories_links_owners_and_modes_are_unpacked() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = scene();
    let stats = s
        .apply(
            Tar::default()
                .dir("usr/")
                .dir("usr/bin/")
                .file("usr/bin/tool", b"#!/bin/sh\n")
                .entry(tar::EntryType::Regular, "usr/bin/su", "", b"su", 0o4755)
                .symlink("bin", "usr/bin")
                .hardlink("usr/bin/tool2", "usr/bin/tool")
                // A file whose directories the tar does not list.
                .file("./etc/deep/conf", b"x=1"),
        )
        .unwrap();
    assert_eq!(stats.entries, 7);
    assert_eq!(stats.bytes, 10 + 2 + 3);
    assert_eq!(s.read("bin/tool").as_deref(), Some("#!/bin/sh\n"));
    assert_eq!(s.read("etc/deep/conf").as_deref(), Some("x=1"));
    let tool = std::fs::metadata(s.root.join("usr/bin/tool")).unwrap();
    let tool2 = std::fs::metadata(s.root.join("usr/bin/tool2")).unwrap();
    assert_eq!(tool.ino(), tool2.ino(), "a hard link shares the inode");
    assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
    assert_eq!(tool.mtime(), 1_700_000_000);
    let su = std::fs::metadata(s.root.join("usr/bin/su")).unwrap();
    assert_eq!(
        su.permissions().mode() & 0o7777,
        0o4755,
        "setuid kept after chown"
    );
    assert_eq!(
        std::fs::read_link(s.root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
}

#[test]
fn a_parent_directory_in_an_entry_refuses_the_layer() {
    let s = scene();
    for name in [
        "../outside/owned",
        "a/../../outside/owned",
        "/../outside/owned",
    ] {
        let err = s.apply(Tar::default().file(name, b"pwned")).unwrap_err();
        assert!(matches!(err, RootfsError::Escape { .. }), "{name}: {err}");
        assert!(
            err.to_string().contains("names a parent directory"),
            "{err}"
        );
    }
    let err = s
        .apply(Tar::default().file("f", b"").hardlink("l", "../outside/x"))
        .unwrap_err();
    assert!(matches!(err, RootfsError::Escape { .. }), "{err}");
    s.assert_outside_untouched();
}

#[test]
fn symlinks_that_point_outside_are_followed_only_inside_the_root() {
    let s = scene();
    let abs = s.outside.display().to_string();
    s.apply(
        Tar::default()
            .symlink("abs", &abs)
            .symlink("up", "../../../../..")
            .symlink("etc", "/")
            // Entries written through each symlink.
            .file("abs/through-absolute", b"1")
            .file("up/through-relative", b"2")
            .file("etc/through-root", b"3"),
    )
    .unwrap();
    s.assert_outside_untouched();
    assert_eq!(
        std::fs::read_to_string(s.outside_in_root().join("through-absolute")).unwrap(),
        "1"
    );
    assert_eq!(s.read("through-relative").as_deref(), Some("2"));
    assert_eq!(s.read("through-root").as_deref(), Some("3"));
}

#[test]
fn a_hard_link_cannot_name_a_file_outside_the_root() {
    let s = scene();
    let secret = s.outside.join("secret");
    std::fs::write(&secret, "node's").unwrap();
    let abs = secret.display().to_string();
    // Absolute, and through a symlink that points out: both resolve inside the root,
    // where there is no such file.
    let err = s
        .apply(Tar::default().hardlink("stolen", &abs))
        .unwrap_err();
    assert!(matches!(err, RootfsError::Entry { .. }), "{err}");
    let err = s
        .apply(
            Tar::default()
                .symlink("out", &s.outside.display().to_string())
                .hardlink("stolen", "out/secret"),
        )
        .unwrap_err();
    assert!(matches!(err, RootfsError::Entry { .. }), "{err}");
    assert!(!s.root.join("stolen").exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "node's");
}

#[test]
fn an_entry_replaces_a_symlink_instead_of_writing_through_it() {
    let s = scene();
    let victim = s.outside.join("victim");
    // A lower layer's symlink to a node path (resolved in the root, it leads nowhere
    // outside), then a file of the same name.
    s.apply(Tar::default().symlink("s", &victim.display().to_string()))
        .unwrap();
    s.apply(Tar::default().file("s", b"replaced")).unwrap();
    assert_eq!(s.read("s").as_deref(), Some("replaced"));
    assert!(!std::fs::symlink_metadata(s.root.join("s"))
        .unwrap()
        .is_symlink());
    s.assert_outside_untouched();
}

#[test]
fn whiteouts_delete_and_opaque_directories_hide_the_layers_below() {
    let s = scene();
    s.apply(
        Tar::default()
            .file("a/x", b"x")
            .file("a/y", b"y")
            .file("a/sub/deep", b"d")
            .file("b", b"b")
            .file("c/keep", b"c"),
    )
    .unwrap();
    let stats = s
        .apply(
            Tar::default()
                // This layer's own entry of the opaque directory comes first in the tar.
                .file("a/z", b"z")
                .file("a/.wh..wh..opq", b"")
                .file(".wh.b", b"")
                .file("c/.wh.missing", b""),
        )
        .unwrap();
    assert_eq!(stats.whiteouts, 3);
    let mut names: Vec<_> = std::fs::read_dir(s.root.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["z"]);
    assert!(!s.root.join("b").exists());
    assert_eq!(s.read("c/keep").as_deref(), Some("c"));
    // A whiteout marker is never created as a file.
    assert!(!s.root.join(".wh.b").exists());
}

#[test]
fn a_whiteout_through_a_symlink_deletes_inside_the_root_only() {
    let s = scene();
    std::fs::write(s.outside.join("keep"), "node's").unwrap();
    s.apply(
        Tar::default()
            .symlink("out", &s.outside.display().to_string())
            .file("out/.wh.keep", b""),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(s.outside.join("keep")).unwrap(),
        "node's"
    );
}

#[test]
fn devices_are_skipped_and_fifos_created() {
    let s = scene();
    let stats = s
        .apply(
            Tar::default()
                .entry(tar::EntryType::Char, "dev/null", "", b"", 0o666)
                .entry(tar::EntryType::Block, "dev/sda", "", b"", 0o660)
                .entry(tar::EntryType::Fifo, "run/pipe", "", b"", 0o600),
        )
        .unwrap();
    assert_eq!(stats.skipped_devices, 2);
    assert!(!s.root.join("dev/null").exists());
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(s.root.join("run/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn limits_hold_and_a_failed_image_leaves_nothing() {
    let s = scene();
    let dest = s.root.join("image");
    let big = Tar::default()
        .file("a", &[0u8; 4096])
        .file("b", &[0u8; 4096]);
    let limits = Limits {
        max_bytes: 6000,
        max_entries: 100,
    };
    let err = unpack_image(&dest, [(&big.bytes()[..], Compression::None)], limits).unwrap_err();
    assert!(
        matches!(err, RootfsError::TooLarge { limit: 6000 }),
        "{err}"
    );
    let many = (0..20).fold(Tar::default(), |t, i| t.file(&format!("f{i}"), b""));
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 10,
    };
    let err = unpack_image(&dest, [(&many.bytes()[..], Compression::None)], limits).unwrap_err();
    assert!(
        matches!(err, RootfsError::TooManyEntries { limit: 10 }),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&s.root).unwrap().count(),
        0,
        "nothing left"
    );
}

#[test]
fn compressed_layers_stack_and_corrupt_ones_are_refused() {
    use std::io::Write;
    let s = scene();
    let dest = s.root.join("image");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&Tar::default().file("etc/os-release", b"ID=test").bytes())
        .unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&Tar::default().file("bin/sh", b"shell").bytes()[..], 1).unwrap();
    let stats = unpack_image(
        &dest,
        [(&gz[..], Compression::Gzip), (&zst[..], Compression::Zstd)],
        Limits::default(),
    )
    .unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(
        std::fs::read_to_string(dest.join("bin/sh")).unwrap(),
        "shell"
    );

    let mut corrupt = gz.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    corrupt.truncate(mid + 4);
    let err = unpack_image(
        &s.root.join("broken"),
        [(&corrupt[..], Compression::Gzip)],
        Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RootfsError::Corrupt(_)), "{err}");
    assert!(!s.root.join("broken").exists());
    assert_eq!(
        Compression::of_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        Some(Compression::Gzip)
    );
    assert_eq!(Compression::of_media_type("application/wasm"), None);
}

#[test]
fn a_layer_must_unpack_to_its_diff_id() {
    use sha2::Digest;
    let s = scene();
    let tar = Tar::default().file("etc/motd", b"hi").bytes();
    let right = format!("sha256:{:x}", sha2::Sha256::digest(&tar));
    let gz = {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    };
    // The digest is the uncompressed tar's, whatever the compression.
    unpack_image_verified(
        &s.root.join("good"),
        [(
            &gz[..],
            Compression::Gzip,
            Some(right.to_uppercase().replace("SHA256", "sha256")),
        )],
        Limits::default(),
    )
    .unwrap();
    let wrong = format!("sha256:{:x}", sha2::Sha256::digest(b"another"));
    let err = unpack_image_verified(
        &s.root.join("bad"),
        [(&tar[..], Compression::None, Some(wrong.clone()))],
        Limits::default(),
    )
    .unwrap_err();
    match err {
        RootfsError::DiffId {
            layer,
            expected,
            found,
        } => assert_eq!((layer, expected, found), (0, wrong, right)),
        other => panic!("{other}"),
    }
    assert!(
        !s.root.join("bad").exists(),
        "nothing is left of a refused image"
    );
}
