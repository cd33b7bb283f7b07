//! `/api/v1/products`: create and delete (admin), list and get, and read a product's secret.
//!
//! The product secret is in the create response and in `GET /api/v1/products/{pk}/secret`,
//! which needs the role that may create products (admin); lists and the single GET never carry
//! it.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::RequireAdmin;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::instances::PageQuery;
use super::{ApiState, ItemsPage};
use crate::registry::{NewProduct, Product};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The product routes (`/api/v1/products…`).
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(create_product, list_products))
        .routes(routes!(get_product, delete_product))
        .routes(routes!(get_product_secret))
}

/// Body of `POST /api/v1/products`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProductRequest {
    /// 1 to 64 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: String,
    /// Generated when absent: 1 to 32 ASCII letters and digits, not a topic namespace
    /// (`sys`, `ota`, …).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 32, pattern = "^[A-Za-z0-9]{1,32}$")]
    pub product_key: Option<String>,
    /// Owning instance; `default` when absent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub instance_id: Option<String>,
    /// At most 100 characters, no control characters but newlines.
    #[serde(default)]
    #[schema(
        max_length = 100,
        pattern = "^[^\\u0000-\\u0009\\u000B-\\u001F\\u007F-\\u009F]*$"
    )]
    pub description: Option<String>,
}

/// A product as lists and the single GET show it: everything but the secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProductSummary {
    pub product_key: String,
    pub name: String,
    pub instance_id: String,
    pub description: Option<String>,
    pub created_at_ms: i64,
    pub device_count: u64,
}

impl From<Product> for ProductSummary {
    fn from(p: Product) -> Self {
        ProductSummary {
            product_key: p.product_key,
            name: p.name,
            instance_id: p.instance_id,
            description: p.description,
            created_at_ms: p.created_at_ms,
            device_count: p.device_count,
        }
    }
}

/// Response of `POST /api/v1/products`: the new product and its secret. No `Debug`: it holds a
/// secret.
#[derive(Clone, Serialize, ToSchema)]
pub struct CreatedProduct {
    #[serde(flatten)]
    pub product: ProductSummary,
    pub product_secret: String,
}

impl From<Product> for CreatedProduct {
    fn from(p: Product) -> Self {
        let product_secret = p.product_secret.clone();
        CreatedProduct {
            product: p.into(),
            product_secret,
        }
    }
}

/// Response of `GET /api/v1/products/{pk}/secret`. No `Debug`: it holds a secret.
#[derive(Clone, Serialize, ToSchema)]
pub struct ProductSecret {
    pub product_key: String,
    pub product_secret: String,
}

/// Create a product (admin). The response carries the `product_secret` (later readable only
/// through `GET /api/v1/products/{pk}/secret`, admin).
#[utoipa::path(
    post,
    path = "/api/v1/products",
    tag = "products",
    request_body = CreateProductRequest,
    responses(
        (status = 201, description = "Created; the only response with the secret besides `…/secret`", body = CreatedProduct),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
        (status = 409, description = "Product key taken (FG.2102)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_product(
    _admin: RequireAdmin,
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<CreateProductRequest>,
) -> Result<(StatusCode, Json<CreatedProduct>), ApiError> {
    let product = state
        .registry
        .create_product(NewProduct {
            name: req.name,
            product_key: req.product_key,
            instance_id: req.instance_id,
            description: req.description,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(product.into())))
}

/// List products (without secrets).
#[utoipa::path(
    get,
    path = "/api/v1/products",
    tag = "products",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of products", body = ItemsPage<ProductSummary>),
        (status = 400, description = "Invalid page or page_size", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_products(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ItemsPage<ProductSummary>>, ApiError> {
    let page = q.page()?;
    let paged = state.registry.list_products(page);
    Ok(Json(ItemsPage::from_paged(paged, ProductSummary::from)))
}

/// Get one product (without its secret: see `GET /api/v1/products/{pk}/secret`).
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}",
    tag = "products",
    params(("pk" = String, Path, description = "Product key")),
    responses(
        (status = 200, description = "The product", body = ProductSummary),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_product(
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
) -> Result<Json<ProductSummary>, ApiError> {
    Ok(Json(state.registry.get_product(&pk)?.into()))
}

/// Read a product's secret (admin: the role that creates products). Each read is logged (who,
/// which product — never the secret).
#[utoipa::path(
    get,
    path = "/api/v1/products/{pk}/secret",
    tag = "products",
    params(("pk" = String, Path, description = "Product key")),
    responses(
        (status = 200, description = "The product's secret (`Cache-Control: no-store`)", body = ProductSecret),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin (checked before the product is looked up)", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_product_secret(
    _admin: RequireAdmin,
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let product = state.registry.get_product(&pk)?;
    // The request span carries the caller's role and the request id.
    tracing::info!(product_key = %pk, "product secret read");
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(ProductSecret {
            product_key: product.product_key,
            product_secret: product.product_secret,
        }),
    ))
}

/// Delete a product (admin). Refused with 409 while it still has devices: delete those first
/// (which drops their MQTT sessions), so no session outlives its product.
#[utoipa::path(
    delete,
    path = "/api/v1/products/{pk}",
    tag = "products",
    params(("pk" = String, Path, description = "Product key")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such product (FG.2002)", body = ErrorBody),
        (status = 409, description = "The product still has devices (FG.0409)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_product(
    _admin: RequireAdmin,
    State(state): State<ApiState>,
    ApiPath(pk): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.registry.delete_product(&pk).await?;
    Ok(StatusCode::NO_CONTENT)
}
