//! Client (stub).
/// Client.
pub struct ReplyingClient;
/// Options.
pub struct RequestOptions;
