fn main() {
    common::logging::init("fuse-client");
    tracing::error!("fuse-client is not implemented yet");
    std::process::exit(2);
}
