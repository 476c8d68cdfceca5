//! `include_dir!` embeds `image/` at compile time, but stable Rust does not
//! track the files it read: tell Cargo to rebuild when anything there changes.
fn main() {
    println!("cargo:rerun-if-changed=../../image");
}
