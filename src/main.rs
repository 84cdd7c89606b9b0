//! The `midge` binary: CLI → Config → run.
fn main() {
    println!("midge {}", env!("CARGO_PKG_VERSION"));
}
