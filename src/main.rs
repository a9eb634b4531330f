fn main() {
    println!("lithe");
}
