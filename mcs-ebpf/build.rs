fn main() {
    // Rebuild the object when the shared layout changes, not only our own sources.
    println!("cargo:rerun-if-changed=../mcs-common/src");
}
