//! [`ApiMultipart`]: a `multipart/form-data` body read part by part, every failure an
//! [`ApiError`] in the standard body. The API's three forms — the firmware upload, the import
//! package and the OTA job with a device list — read their parts through it; each form's type
//! says how its failures read ([`MultipartForm`]: the 413 names the route's own limit).

use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;

use crate::api::error::ApiError;

/// How one form's failures read. The defaults: not multipart → 415 naming
/// `multipart/form-data`, past the route's body limit → 413 `request body too large`, a broken
/// body → 400 `could not read the multipart body: …`.
pub trait MultipartForm {
    /// The body is not `multipart/form-data` with a boundary.
    fn not_multipart(_rejection: &MultipartRejection) -> ApiError {
        ApiError::unsupported_media_type("multipart/form-data")
    }

    /// The body went past the route's body limit.
    fn too_large() -> ApiError {
        ApiError::payload_too_large()
    }

    /// The body is not well-formed multipart, between parts (`part` is `None`) or inside one.
    fn malformed(_part: Option<&str>, error: &MultipartError) -> ApiError {
        ApiError::bad_request(format!(
            "could not read the multipart body: {}",
            error.body_text()
        ))
    }
}

/// A `multipart/form-data` body of form `F` (use `Result<ApiMultipart<F>, ApiError>` to check
/// other things before the body's type).
pub struct ApiMultipart<F> {
    inner: Multipart,
    form: PhantomData<fn() -> F>,
}

impl<F: MultipartForm, S: Send + Sync> FromRequest<S> for ApiMultipart<F> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Multipart::from_request(req, state).await {
            Ok(inner) => Ok(ApiMultipart {
                inner,
                form: PhantomData,
            }),
            Err(rejection) => Err(F::not_multipart(&rejection)),
        }
    }
}

impl<F: MultipartForm> ApiMultipart<F> {
    /// The next part, `None` after the last.
    pub async fn next_part(&mut self) -> Result<Option<Part<'_, F>>, ApiError> {
        match self.inner.next_field().await {
            Ok(Some(field)) => Ok(Some(Part {
                name: field.name().unwrap_or_default().to_owned(),
                field,
                form: PhantomData,
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(failure::<F>(None, &e)),
        }
    }
}

/// One part of an [`ApiMultipart`] body.
pub struct Part<'a, F> {
    name: String,
    field: Field<'a>,
    form: PhantomData<fn() -> F>,
}

impl<F: MultipartForm> Part<'_, F> {
    /// The part's name (`""` when it has none).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next chunk of the part's bytes, `None` at its end (to stream a large part).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ApiError> {
        let name = &self.name;
        self.field
            .chunk()
            .await
            .map_err(|e| failure::<F>(Some(name), &e))
    }

    /// The whole part, within the route's body limit.
    pub async fn bytes(self) -> Result<Bytes, ApiError> {
        let name = self.name;
        self.field
            .bytes()
            .await
            .map_err(|e| failure::<F>(Some(&name), &e))
    }

    /// The whole part, at most `limit` bytes; beyond, the answer `over(name)` (read no further).
    pub async fn bytes_up_to(
        mut self,
        limit: u64,
        over: impl FnOnce(&str) -> ApiError,
    ) -> Result<Vec<u8>, ApiError> {
        let mut buf = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(over(&self.name));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    }

    /// The part as UTF-8 text of at most `limit` bytes (`over(name)` beyond; FG.1001 naming
    /// the part when it is not UTF-8).
    pub async fn text_up_to(
        self,
        limit: u64,
        over: impl FnOnce(&str) -> ApiError,
    ) -> Result<String, ApiError> {
        let name = self.name.clone();
        let bytes = self.bytes_up_to(limit, over).await?;
        String::from_utf8(bytes).map_err(|_| ApiError::invalid_field(name, "not UTF-8"))
    }
}

/// A failure reading the body: the form's 413 when the route's limit was hit, else its 400.
fn failure<F: MultipartForm>(part: Option<&str>, error: &MultipartError) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        F::too_large()
    } else {
        F::malformed(part, error)
    }
}
