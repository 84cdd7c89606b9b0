fn main() {
    println!("midge-loadgen: not yet implemented");
}
