//! `#[derive(Request)]`: turns `#[request(...)]` into an `impl kafka_rpc::request::Request`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, LitStr, Member, Type};

/// What `#[request(...)]` said, before it is checked against the item.
#[derive(Default)]
struct RequestArgs {
    type_name: Option<LitStr>,
    response: Option<Type>,
    key: Option<Member>,
}

pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let args = parse_args(&input)?;
    let type_name = args.type_name.ok_or_else(|| {
        syn::Error::new_spanned(
            attr_span(&input),
            "missing `type` in `#[request(...)]`: the dispatch name servers route on, e.g. \
             `#[request(type = \"delivery.radius.reduce\", response = RadiusReduced)]`",
        )
    })?;
    let response = args.response.ok_or_else(|| {
        syn::Error::new_spanned(
            attr_span(&input),
            "missing `response` in `#[request(...)]`: the type handlers answer with, e.g. \
             `#[request(type = \"delivery.radius.reduce\", response = RadiusReduced)]`",
        )
    })?;

    let key_body = match &args.key {
        None => quote!(::core::option::Option::None),
        Some(member) => key_expr(&input, member)?,
    };

    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::kafka_rpc::request::Request for #name #ty_generics #where_clause {
            const TYPE: &'static str = #type_name;
            type Response = #response;
            fn key(&self) -> ::core::option::Option<::std::vec::Vec<u8>> {
                #key_body
            }
        }
    })
}

/// Where to point errors about the attribute as a whole: the first `#[request]`, or the
/// type's name when the attribute is missing altogether.
fn attr_span(input: &DeriveInput) -> TokenStream {
    input
        .attrs
        .iter()
        .find(|a| a.path().is_ident("request"))
        .map(|a| a.to_token_stream())
        .unwrap_or_else(|| input.ident.to_token_stream())
}

fn parse_args(input: &DeriveInput) -> syn::Result<RequestArgs> {
    let mut args = RequestArgs::default();
    let mut errors: Option<syn::Error> = None;
    let mut push = |e: syn::Error| match &mut errors {
        Some(all) => all.combine(e),
        None => errors = Some(e),
    };
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("request")) {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("type") {
                let lit: LitStr = meta.value()?.parse()?;
                if lit.value().trim().is_empty() {
                    return Err(syn::Error::new(lit.span(), "the request `type` must not be empty"));
                }
                set_once(&mut args.type_name, lit, &meta, "type")
            } else if meta.path.is_ident("response") {
                let ty: Type = meta.value()?.parse()?;
                set_once(&mut args.response, ty, &meta, "response")
            } else if meta.path.is_ident("key") {
                let member: Member = meta.value()?.parse()?;
                set_once(&mut args.key, member, &meta, "key")
            } else {
                let shown = meta.path.get_ident().map(ToString::to_string).unwrap_or_else(|| "this".into());
                Err(meta.error(format!(
                    "unknown `#[request]` option `{shown}`; expected `type = \"...\"`, `response = Type` or `key = field`"
                )))
            }
        });
        if let Err(e) = result {
            push(e);
        }
    }
    match errors {
        Some(e) => Err(e),
        None => Ok(args),
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, meta: &syn::meta::ParseNestedMeta<'_>, name: &str) -> syn::Result<()> {
    if slot.is_some() {
        return Err(meta.error(format!("`{name}` is given more than once")));
    }
    *slot = Some(value);
    Ok(())
}

/// The body of `key()`. The call is spanned at the field's type so that a type without
/// `PartitionKey` is reported on the field, not on the derive.
fn key_expr(input: &DeriveInput, member: &Member) -> syn::Result<TokenStream> {
    let fields = match &input.data {
        Data::Struct(s) => &s.fields,
        Data::Enum(_) => {
            return Err(syn::Error::new(
                member.span(),
                "`key` is only supported on structs: an enum has no field common to every variant; \
                 implement `kafka_rpc::request::Request` by hand to key an enum",
            ))
        }
        Data::Union(u) => {
            return Err(syn::Error::new(u.union_token.span, "`#[derive(Request)]` does not support unions"))
        }
    };
    let (field_ty, access) = match (fields, member) {
        (Fields::Named(named), Member::Named(ident)) => named
            .named
            .iter()
            .find(|f| f.ident.as_ref() == Some(ident))
            .map(|f| {
                let field = &f.ident;
                (&f.ty, quote_spanned!(f.ty.span()=> self.#field))
            })
            .ok_or_else(|| {
                let known: Vec<String> =
                    named.named.iter().filter_map(|f| f.ident.as_ref()).map(ToString::to_string).collect();
                syn::Error::new(
                    ident.span(),
                    format!(
                        "`key = {ident}` names no field of `{}`; its fields are: {}",
                        input.ident,
                        known.join(", ")
                    ),
                )
            })?,
        (Fields::Unnamed(unnamed), Member::Unnamed(index)) => unnamed
            .unnamed
            .iter()
            .nth(index.index as usize)
            .map(|f| {
                let position = syn::Index { index: index.index, span: f.ty.span() };
                (&f.ty, quote_spanned!(f.ty.span()=> self.#position))
            })
            .ok_or_else(|| {
                syn::Error::new(
                    index.span,
                    format!("`key = {}`: `{}` has only {} field(s)", index.index, input.ident, unnamed.unnamed.len()),
                )
            })?,
        (Fields::Unnamed(_), Member::Named(ident)) => {
            return Err(syn::Error::new(
                ident.span(),
                format!("`{}` is a tuple struct: name the key field by position, e.g. `key = 0`", input.ident),
            ))
        }
        (Fields::Named(_), Member::Unnamed(index)) => {
            return Err(syn::Error::new(
                index.span,
                format!("`{}` has named fields: name the key field, e.g. `key = store_id`", input.ident),
            ))
        }
        (Fields::Unit, _) => {
            return Err(syn::Error::new(
                member.span(),
                format!(
                    "`{}` has no fields to take a key from; leave `key` out to spread requests round-robin",
                    input.ident
                ),
            ))
        }
    };

    let span = field_ty.span();
    // `Option<K>` keys: `None` means "no key" (round-robin), matching the trait's own meaning.
    if let Some(inner) = option_inner(field_ty) {
        let call = quote_spanned!(inner.span()=> ::kafka_rpc::request::PartitionKey::key_bytes(__kafka_rpc_key));
        Ok(quote!(::core::option::Option::map(::core::option::Option::as_ref(&#access), |__kafka_rpc_key| #call)))
    } else {
        let call = quote_spanned!(span=> ::kafka_rpc::request::PartitionKey::key_bytes(&#access));
        Ok(quote!(::core::option::Option::Some(#call)))
    }
}

/// `T` when the type is written `Option<T>` (with any path prefix).
fn option_inner(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else { return None };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else { return None };
    match (args.args.len(), args.args.first()) {
        (1, Some(syn::GenericArgument::Type(inner))) => Some(inner),
        _ => None,
    }
}
