//! OpenAPI schema fragments that request types share, for the fields a `#[schema(...)]`
//! attribute cannot describe on its own: lists whose items have bounds, and string maps whose
//! keys and values have bounds. Each request type states with them the rules its validator
//! enforces (`api::tests` checks that no request field is left without any).

use utoipa::openapi::schema::{
    AdditionalProperties, Array, ArrayBuilder, Object, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;

/// Text without control characters (Unicode `Cc`, what `char::is_control` refuses).
pub const NO_CONTROL_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";

/// A string of `min..=max` characters, matching `pattern` when given.
pub fn text(min: usize, max: usize, pattern: Option<&str>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
        .pattern(pattern)
        .build()
}

/// A list of at most `max_items` strings (`item`), `null` too when `nullable`.
pub fn string_list(
    description: &str,
    nullable: bool,
    max_items: usize,
    item: Object,
    unique: bool,
) -> Array {
    let ty = if nullable {
        SchemaType::from_iter([Type::Array, Type::Null])
    } else {
        SchemaType::Type(Type::Array)
    };
    ArrayBuilder::new()
        .schema_type(ty)
        .description(Some(description))
        .items(item)
        .max_items(Some(max_items))
        .unique_items(unique)
        .build()
}

/// A JSON object of at most `max_properties` string values (`value`) whose keys satisfy `key`,
/// `null` too when `nullable`.
pub fn string_map(
    description: &str,
    nullable: bool,
    max_properties: usize,
    key: Object,
    value: Object,
) -> Object {
    let ty = if nullable {
        SchemaType::from_iter([Type::Object, Type::Null])
    } else {
        SchemaType::Type(Type::Object)
    };
    ObjectBuilder::new()
        .schema_type(ty)
        .description(Some(description))
        .max_properties(Some(max_properties))
        .property_names(Some(key))
        .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(Schema::Object(
            value,
        )))))
        .build()
}
