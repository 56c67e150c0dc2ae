//! OpenAI wire types: requests as clients send them (lenient, every field optional where OpenAI
//! allows it, unknown fields ignored) and responses as the official clients parse them. No
//! validation here; that is `crate::validation`.

pub mod request;
pub mod response;
