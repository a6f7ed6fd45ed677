fn main() {
    common::logging::init("migd");
}
