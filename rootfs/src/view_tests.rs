//! Views of an image: a container's writes stay its own, and removal leaves nothing.

use super::*;

fn image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    std::fs::create_dir_all(image.join("etc")).unwrap();
    std::fs::write(image.join("etc/conf"), "from the image").unwrap();
    std::os::unix::fs::symlink("etc/conf", image.join("link")).unwrap();
    (dir, image)
}

fn check_isolated(image: &Path, a: &View, b: &View) {
    std::fs::write(a.root.join("etc/conf"), "changed by a").unwrap();
    std::fs::write(a.root.join("new"), "a's own").unwrap();
    assert_eq!(
        std::fs::read_to_string(b.root.join("etc/conf")).unwrap(),
        "from the image"
    );
    assert!(!b.root.join("new").exists());
    assert_eq!(
        std::fs::read_to_string(image.join("etc/conf")).unwrap(),
        "from the image"
    );
    assert_eq!(
        std::fs::read_to_string(a.root.join("link")).unwrap(),
        "changed by a"
    );
}

#[test]
fn each_view_writes_its_own_layer_and_leaves_the_image_alone() {
    let (dir, image) = image();
    let a = create_view(&image, &dir.path().join("a")).unwrap();
    let b = create_view(&image, &dir.path().join("b")).unwrap();
    // Root on ext4 here: the kernel allows overlayfs.
    assert_eq!(a.kind, ViewKind::Overlay);
    check_isolated(&image, &a, &b);
    a.remove().unwrap();
    b.remove().unwrap();
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
}

#[test]
fn a_copy_serves_where_overlayfs_cannot() {
    let (dir, image) = image();
    let make = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(d.join("merged")).unwrap();
        copy_tree_for_test(&image, &d.join("merged"));
        View {
            root: d.join("merged"),
            kind: ViewKind::Copy,
            dir: d,
        }
    };
    let (a, b) = (make("a"), make("b"));
    check_isolated(&image, &a, &b);
    a.remove().unwrap();
    b.remove().unwrap();
}

fn copy_tree_for_test(from: &Path, to: &Path) {
    view::copy_tree_pub(from, to).unwrap();
}
