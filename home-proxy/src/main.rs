fn main() {
    common::logging::init("home-proxy");
    tracing::error!("home-proxy is not implemented yet");
    std::process::exit(2);
}
