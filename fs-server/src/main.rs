fn main() {
    common::logging::init("fs-server");
    tracing::error!("fs-server is not implemented yet");
    std::process::exit(2);
}
