//! Gives the shared library a versioned soname on Linux (`libstrata.so.<major>`), so programs
//! linked against one major version keep loading it after a compatible upgrade, as
//! scripts/install.sh lays the files out.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets it");
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libstrata.so.{major}");
    }
}
