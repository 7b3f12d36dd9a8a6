//! `#[handler]`: turns an `async fn` into a constant implementing
//! `kafka_rpc::server::handler::Handler`, still callable as the function.
//!
//! The module-level name becomes a constant of type
//! `kafka_rpc::__private::HandlerFn<fn(...) -> boxed future, Marker>`: it derefs to a
//! pointer to the function, so `reduce_radius(req, ctx).await` still calls it directly,
//! and the trait impl generated for its marker carries the options (dispatch name,
//! timeout), so `server.handler(reduce_radius)` registers them. The function is kept,
//! unchanged and under its own name, inside the constant's initializer next to that impl.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, LitInt, LitStr, PatType, ReturnType, Type};

/// Options given as `#[handler(type = "...", timeout_ms = 250)]`.
#[derive(Default)]
struct HandlerArgs {
    type_name: Option<LitStr>,
    timeout_ms: Option<LitInt>,
}

/// How the function's arguments line up with the blanket `Handler` impls.
enum Shape<'a> {
    Request,
    Context,
    State(&'a Type),
}

pub(crate) fn expand(attr: TokenStream, item: ItemFn) -> syn::Result<TokenStream> {
    let args = parse_args(attr)?;
    let sig = &item.sig;

    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span,
            format!("`#[handler]` needs an `async fn`: write `async fn {}(...)`", sig.ident),
        ));
    }
    if let Some(c) = &sig.constness {
        return Err(syn::Error::new(c.span, "a `#[handler]` cannot be a `const fn`"));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a `#[handler]` cannot be generic: it serves one concrete request type",
        ));
    }

    if let Some(expanded) = expand_batch(&args, &item)? {
        return Ok(expanded);
    }
    let (req_ty, shape) = check_inputs(&item)?;
    let (ok_span, err_span) = check_output(&item)?;

    let name = &sig.ident;
    let vis = &item.vis;
    // Docs and deprecation describe the name users see (the struct); `cfg`s must apply to
    // everything generated; the rest (lints, instrumentation, and `cfg_attr`, which may
    // carry either) belongs to the function.
    let struct_attrs =
        item.attrs.iter().filter(|a| a.path().is_ident("doc") || a.path().is_ident("deprecated") || is_cfg(a));
    let cfg_attrs: Vec<_> = item.attrs.iter().filter(|a| is_cfg(a)).collect();
    let fn_attrs = item.attrs.iter().filter(|a| !a.path().is_ident("doc") && !a.path().is_ident("deprecated"));
    let block = &item.block;
    let inner_sig = &item.sig;

    let kr = quote!(::kafka_rpc);
    let h = quote!(#kr::server::handler);
    let p = quote!(#kr::__private);
    let response_trait = format_ident!("__KafkaRpcResponse");
    let req_name = escape_format(&type_display(req_ty));
    let mismatch_message =
        format!("handler `{name}` answers with `{{Self}}`, but `{req_name}` expects `{{Expected}}` as its response");
    let mismatch_label = format!("`{req_name}::Response` is `{{Expected}}`");
    let mismatch_note =
        format!("either return `Result<{{Expected}}, _>` or change `response = ...` on `{req_name}`'s `#[request]`");

    // The call itself is spanned at the response type so a mismatch is reported there.
    let convert = quote_spanned!(ok_span=>
        <_ as #response_trait<<#req_ty as #kr::request::Request>::Response>>::__into_response(__kafka_rpc_response)
    );
    let convert_err =
        quote_spanned!(err_span=> ::core::convert::Into::<#kr::error::RemoteError>::into(__kafka_rpc_error));
    let output = match &sig.output {
        ReturnType::Type(_, output) => quote!(#output),
        // `check_output` rejected this already.
        ReturnType::Default => quote!(()),
    };
    // One function converts the result for both trait methods, so a mismatch is
    // reported once. Generated bindings carry a `__kafka_rpc_` prefix: a plain `r` or
    // `e` would turn into a constant pattern if the module had a constant (another
    // handler) of that name.
    let finish_fn = quote! {
        fn __kafka_rpc_finish(__kafka_rpc_result: #output) -> #p::HandlerResult<#req_ty> {
            match __kafka_rpc_result {
                ::core::result::Result::Ok(__kafka_rpc_response) => ::core::result::Result::Ok(#convert),
                ::core::result::Result::Err(__kafka_rpc_error) => ::core::result::Result::Err(#convert_err),
            }
        }
    };

    // The boxed future is spanned at the function's name, so a future that is not `Send`
    // is reported there rather than at the attribute. `then` is what the boxed future
    // does with the converted result: return it (`call`) or encode it (`call_encoded`).
    let boxed = |call: &TokenStream, then: &TokenStream| {
        quote_spanned! {name.span()=>
            {
                // Called before the block, which must not borrow `self`.
                let __kafka_rpc_future = #call;
                ::std::boxed::Box::pin(async move {
                    let __kafka_rpc_result = __kafka_rpc_finish(__kafka_rpc_future.await);
                    #then
                })
            }
        }
    };
    let bodies = |then: TokenStream| match shape {
        Shape::Request => {
            let fut = boxed(&quote!((self.f)(__kafka_rpc_request)), &then);
            quote! { let _ = __kafka_rpc_ctx; #fut }
        }
        Shape::Context => boxed(&quote!((self.f)(__kafka_rpc_request, __kafka_rpc_ctx)), &then),
        Shape::State(state_ty) => {
            let fut = boxed(&quote!((self.f)(__kafka_rpc_request, __kafka_rpc_ctx, #h::State(__kafka_rpc_state))), &then);
            quote! {
                match __kafka_rpc_ctx.state::<#state_ty>() {
                    ::core::option::Option::Some(__kafka_rpc_state) => #fut,
                    // Unreachable through RpcServer, which checks requirements when it is built.
                    ::core::option::Option::None => ::std::boxed::Box::pin(::core::future::ready(
                        ::core::result::Result::Err(#p::missing_state::<#state_ty>()),
                    )),
                }
            }
        }
    };
    let body = bodies(quote!(__kafka_rpc_result));
    let body_encoded = bodies(quote! {
        #p::encode_response::<#req_ty>(__kafka_rpc_content_type, __kafka_rpc_result)
    });
    let state_fn = match shape {
        Shape::State(state_ty) => quote! {
            fn state_requirement(&self) -> ::core::option::Option<#p::StateRequirement> {
                ::core::option::Option::Some(#p::StateRequirement::of::<#state_ty>())
            }
        },
        _ => quote!(),
    };

    let (request_type_fn, timeout_fn) = option_fns(&args);
    let request_assoc = quote_spanned!(req_ty.span()=> type Request = #req_ty;);
    let Direct { marker, handler_ty, pointer } = direct_call(&item);

    Ok(quote! {
        #(#cfg_attrs)*
        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy)]
        #vis struct #marker;

        #(#struct_attrs)*
        #[allow(non_upper_case_globals)]
        #vis const #name: #handler_ty = {
            #(#fn_attrs)*
            #inner_sig #block

            #pointer
        };

        // Impls go in an anonymous constant: inside the named one they would be
        // non-local definitions.
        #(#cfg_attrs)*
        const _: () = {
            #[diagnostic::on_unimplemented(message = #mismatch_message, label = #mismatch_label, note = #mismatch_note)]
            #[allow(non_camel_case_types)]
            trait #response_trait<Expected> {
                fn __into_response(self) -> Expected;
            }
            impl<T> #response_trait<T> for T {
                fn __into_response(self) -> T {
                    self
                }
            }

            #finish_fn

            #[automatically_derived]
            impl #h::Handler<#marker> for #handler_ty {
                #request_assoc

                fn call(
                    &self,
                    __kafka_rpc_request: Self::Request,
                    __kafka_rpc_ctx: #h::Context,
                ) -> ::core::pin::Pin<::std::boxed::Box<
                    dyn ::core::future::Future<Output = #p::HandlerResult<Self::Request>> + ::core::marker::Send + 'static,
                >> {
                    #body
                }

                fn call_encoded(
                    &self,
                    __kafka_rpc_request: Self::Request,
                    __kafka_rpc_ctx: #h::Context,
                    __kafka_rpc_content_type: #kr::codec::ContentType,
                ) -> ::core::pin::Pin<::std::boxed::Box<
                    dyn ::core::future::Future<
                        Output = ::core::result::Result<::std::vec::Vec<u8>, #kr::error::RemoteError>,
                    > + ::core::marker::Send + 'static,
                >> {
                    #body_encoded
                }

                #request_type_fn
                #timeout_fn
                #state_fn
            }
        };
    })
}

/// The trait methods the options override, shared by `Handler` and `BatchHandler`
/// (both have `request_type` and `timeout` with these signatures).
fn option_fns(args: &HandlerArgs) -> (Option<TokenStream>, Option<TokenStream>) {
    let request_type_fn = args.type_name.as_ref().map(|lit| {
        quote! {
            fn request_type(&self) -> &'static str {
                #lit
            }
        }
    });
    let timeout_fn = args.timeout_ms.as_ref().map(|lit| {
        quote! {
            fn timeout(&self) -> ::core::option::Option<::core::time::Duration> {
                ::core::option::Option::Some(::core::time::Duration::from_millis(#lit))
            }
        }
    });
    (request_type_fn, timeout_fn)
}

/// The pieces that make a handler callable as the function it was written as.
struct Direct {
    /// The marker type the `Handler` impl is generated for (one per handler).
    marker: syn::Ident,
    /// `HandlerFn<fn(...) -> Pin<Box<dyn Future<Output = ...> + Send>>, marker>`.
    handler_ty: TokenStream,
    /// The constant's value: the pointer to the function, boxing its future. A
    /// function pointer because the function's own future type cannot be named.
    pointer: TokenStream,
}

/// Builds [`Direct`] for `item`. The `Handler` impl calls the function through the same
/// pointer, so a future that is not `Send` is reported once, at the function's name.
fn direct_call(item: &ItemFn) -> Direct {
    let sig = &item.sig;
    let name = &sig.ident;
    let marker = format_ident!("__kafka_rpc_handler_{}", name.to_string().trim_start_matches("r#"));
    let output = match &sig.output {
        ReturnType::Type(_, output) => quote!(#output),
        // `check_output` rejected this already.
        ReturnType::Default => quote!(()),
    };
    let inputs: Vec<&Type> = sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(t) => Some(&*t.ty),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let args: Vec<_> = (0..inputs.len()).map(|i| format_ident!("__kafka_rpc_arg{}", i)).collect();
    let handler_ty = quote! {
        ::kafka_rpc::__private::HandlerFn<
            fn(#(#inputs),*) -> ::core::pin::Pin<::std::boxed::Box<
                dyn ::core::future::Future<Output = #output> + ::core::marker::Send + 'static,
            >>,
            #marker,
        >
    };
    let pointer = quote_spanned! {name.span()=>
        <#handler_ty>::new(|#(#args),*| ::std::boxed::Box::pin(#name(#(#args),*)))
    };
    Direct { marker, handler_ty, pointer }
}

fn is_cfg(attr: &syn::Attribute) -> bool {
    attr.path().is_ident("cfg")
}

fn parse_args(attr: TokenStream) -> syn::Result<HandlerArgs> {
    let mut args = HandlerArgs::default();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("type") {
            let lit: LitStr = meta.value()?.parse()?;
            if lit.value().trim().is_empty() {
                return Err(syn::Error::new(lit.span(), "the handler `type` must not be empty"));
            }
            if args.type_name.replace(lit).is_some() {
                return Err(meta.error("`type` is given more than once"));
            }
            Ok(())
        } else if meta.path.is_ident("timeout_ms") {
            let lit: LitInt = meta.value()?.parse()?;
            let millis: u64 = lit.base10_parse()?;
            if millis == 0 {
                return Err(syn::Error::new(
                    lit.span(),
                    "`timeout_ms` must be at least 1; leave it out to use the server's `handler_timeout` (30 s by default)",
                ));
            }
            if args.timeout_ms.replace(LitInt::new(&format!("{millis}u64"), lit.span())).is_some() {
                return Err(meta.error("`timeout_ms` is given more than once"));
            }
            Ok(())
        } else {
            let shown = meta.path.to_token_stream().to_string().replace(' ', "");
            Err(meta.error(format!(
                "unknown `#[handler]` option `{shown}`; expected `type = \"...\"` or `timeout_ms = <milliseconds>`"
            )))
        }
    });
    syn::parse::Parser::parse2(parser, attr)?;
    Ok(args)
}

/// Checks the argument list against the shapes the blanket impls accept, so that a
/// function that compiles with `#[handler]` also compiles without it.
fn check_inputs(item: &ItemFn) -> syn::Result<(&Type, Shape<'_>)> {
    let sig = &item.sig;
    let name = &sig.ident;
    let typed: Vec<&PatType> = sig
        .inputs
        .iter()
        .map(|arg| match arg {
            FnArg::Typed(t) => Ok(t),
            FnArg::Receiver(r) => {
                Err(syn::Error::new_spanned(r, "`#[handler]` goes on a free `async fn`, not on a method taking `self`"))
            }
        })
        .collect::<syn::Result<_>>()?;

    let Some(first) = typed.first() else {
        return Err(syn::Error::new(
            sig.paren_token.span.join(),
            format!("a handler takes the request as its first argument, e.g. `async fn {name}(req: MyRequest)`"),
        ));
    };
    match classify(&first.ty) {
        Kind::Context | Kind::State(_) | Kind::Batch(_) => {
            return Err(syn::Error::new_spanned(
                &first.ty,
                format!(
                    "the request comes first: `async fn {name}(req: MyRequest, ctx: Context, State(s): State<S>)`, \
                     with `Context` and `State` optional"
                ),
            ))
        }
        Kind::Other => {}
    }
    let req_ty = &*first.ty;

    let shape = match typed.get(1) {
        None => Shape::Request,
        Some(second) => match classify(&second.ty) {
            Kind::Context => match typed.get(2) {
                None => Shape::Context,
                Some(third) => match classify(&third.ty) {
                    Kind::State(s) => Shape::State(s),
                    Kind::Batch(_) => {
                        return Err(syn::Error::new_spanned(&third.ty, "a `Batch<Req>` can only be the first handler argument"))
                    }
                    _ => {
                        return Err(syn::Error::new_spanned(
                            &third.ty,
                            "the third handler argument must be shared state, `State(s): State<S>`",
                        ))
                    }
                },
            },
            Kind::State(_) => {
                return Err(syn::Error::new_spanned(
                    &second.ty,
                    format!(
                        "`Context` comes before `State`: write `async fn {name}(req: {}, ctx: Context, State(s): State<S>)`",
                        type_display(req_ty)
                    ),
                ))
            }
            Kind::Other | Kind::Batch(_) => {
                return Err(syn::Error::new_spanned(
                    &second.ty,
                    "the second handler argument must be `Context`; a handler receives one request",
                ))
            }
        },
    };
    if let Some(extra) = typed.get(3) {
        return Err(syn::Error::new_spanned(
            extra,
            "too many handler arguments: a handler takes `(request, Context, State<S>)` at most; \
             bundle several pieces of state into one `State<S>`",
        ));
    }
    Ok((req_ty, shape))
}

enum Kind<'a> {
    Context,
    State(&'a Type),
    /// `Batch<Req>`: the function is a batch handler.
    Batch(&'a Type),
    Other,
}

/// Recognises `Context` and `State<S>` by name (with any path prefix): the generated impl
/// passes the real types, so a look-alike from elsewhere still fails to type-check.
fn classify(ty: &Type) -> Kind<'_> {
    let Type::Path(p) = ty else { return Kind::Other };
    let Some(last) = p.path.segments.last() else { return Kind::Other };
    if last.ident == "Context" && last.arguments.is_none() {
        return Kind::Context;
    }
    if last.ident == "State" || last.ident == "Batch" {
        if let syn::PathArguments::AngleBracketed(a) = &last.arguments {
            if let (1, Some(syn::GenericArgument::Type(inner))) = (a.args.len(), a.args.first()) {
                return if last.ident == "State" { Kind::State(inner) } else { Kind::Batch(inner) };
            }
        }
    }
    Kind::Other
}

/// Checks the return type is `Result<_, _>` and returns the spans to report a response
/// mismatch and an unconvertible error at: the `Ok` and `Err` types when they are written
/// out, else the whole return type.
fn check_output(item: &ItemFn) -> syn::Result<(Span, Span)> {
    let sig = &item.sig;
    let hint = "a handler returns `Result<Response, E>` with `E: Into<RemoteError>`, e.g. `-> Result<RadiusReduced, RemoteError>`";
    let ty = match &sig.output {
        ReturnType::Default => {
            return Err(syn::Error::new(sig.paren_token.span.close(), format!("missing return type: {hint}")))
        }
        ReturnType::Type(_, ty) => ty,
    };
    let Type::Path(p) = &**ty else {
        return Err(syn::Error::new_spanned(ty, hint));
    };
    // Aliases such as `io::Result<T>` or `HandlerResult<R>` are welcome; the generated
    // impl checks the real type, this only catches returning a bare value.
    let Some(last) = p.path.segments.last().filter(|s| s.ident.to_string().ends_with("Result")) else {
        return Err(syn::Error::new_spanned(ty, hint));
    };
    let mut spans = (ty.span(), ty.span());
    if let syn::PathArguments::AngleBracketed(a) = &last.arguments {
        let mut types = a.args.iter().filter_map(|g| match g {
            syn::GenericArgument::Type(t) => Some(t.span()),
            _ => None,
        });
        if let Some(ok) = types.next() {
            spans.0 = ok;
        }
        if let Some(err) = types.next() {
            spans.1 = err;
        }
    }
    Ok(spans)
}

/// The type as a user wrote it, for messages (`a::B<C>` rather than `a :: B < C >`).
fn type_display(ty: &Type) -> String {
    let raw = ty.to_token_stream().to_string();
    raw.replace(" :: ", "::")
        .replace(":: ", "::")
        .replace(" <", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
}

/// Escapes braces for a `#[diagnostic::on_unimplemented]` format string.
fn escape_format(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

/// `#[handler]` on `async fn(Batch<Req>)` or `async fn(Batch<Req>, State<S>)`: a unit
/// struct implementing `BatchHandler`, registered with `.batch_handler(name)`. Returns
/// `None` when the first argument is not a `Batch`.
fn expand_batch(args: &HandlerArgs, item: &ItemFn) -> syn::Result<Option<TokenStream>> {
    let sig = &item.sig;
    let typed: Vec<&PatType> = sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(t) => Some(t),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let Some(Kind::Batch(req_ty)) = typed.first().map(|t| classify(&t.ty)) else { return Ok(None) };
    let name = &sig.ident;
    let state_ty = match typed.get(1).map(|t| (t, classify(&t.ty))) {
        None => None,
        Some((_, Kind::State(s))) => Some(s),
        Some((t, _)) => {
            return Err(syn::Error::new_spanned(
                &t.ty,
                "a batch handler takes `(batch: Batch<Req>)` or `(batch: Batch<Req>, State(s): State<S>)`; each request's `Context` is in the batch (`batch.iter()`)",
            ))
        }
    };
    if let Some(extra) = typed.get(2) {
        return Err(syn::Error::new_spanned(extra, "too many batch handler arguments: `(Batch<Req>, State<S>)` at most"));
    }
    check_output(item)?;
    let vis = &item.vis;
    let struct_attrs =
        item.attrs.iter().filter(|a| a.path().is_ident("doc") || a.path().is_ident("deprecated") || is_cfg(a));
    let cfg_attrs: Vec<_> = item.attrs.iter().filter(|a| is_cfg(a)).collect();
    let fn_attrs = item.attrs.iter().filter(|a| !a.path().is_ident("doc") && !a.path().is_ident("deprecated"));
    let block = &item.block;
    let b = quote!(::kafka_rpc::server::batch);
    let p = quote!(::kafka_rpc::__private);
    let (body, state_fn) = match state_ty {
        None => (
            quote_spanned! {name.span()=>
                let __kafka_rpc_future = (self.f)(__kafka_rpc_batch);
                ::std::boxed::Box::pin(async move { #p::into_outcomes(__kafka_rpc_future.await) })
            },
            quote!(),
        ),
        Some(state_ty) => (
            quote_spanned! {name.span()=>
                match #p::batch_state::<#req_ty, #state_ty>(&__kafka_rpc_batch) {
                    ::core::result::Result::Ok(__kafka_rpc_state) => {
                        let __kafka_rpc_future = (self.f)(__kafka_rpc_batch, __kafka_rpc_state);
                        ::std::boxed::Box::pin(async move { #p::into_outcomes(__kafka_rpc_future.await) })
                    }
                    // Unreachable through RpcServer, which checks requirements when it is built.
                    ::core::result::Result::Err(__kafka_rpc_error) => ::std::boxed::Box::pin(::core::future::ready(
                        ::core::result::Result::Err(__kafka_rpc_error),
                    )),
                }
            },
            quote! {
                fn state_requirement(&self) -> ::core::option::Option<#p::StateRequirement> {
                    ::core::option::Option::Some(#p::StateRequirement::of::<#state_ty>())
                }
            },
        ),
    };
    let (request_type_fn, timeout_fn) = option_fns(args);
    let Direct { marker, handler_ty, pointer } = direct_call(item);
    Ok(Some(quote! {
        #(#cfg_attrs)*
        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy)]
        #vis struct #marker;

        #(#struct_attrs)*
        #[allow(non_upper_case_globals)]
        #vis const #name: #handler_ty = {
            #(#fn_attrs)*
            #sig #block

            #pointer
        };

        #(#cfg_attrs)*
        const _: () = {
            #[automatically_derived]
            impl #b::BatchHandler<#marker> for #handler_ty {
                type Request = #req_ty;

                fn call(
                    &self,
                    __kafka_rpc_batch: #b::Batch<Self::Request>,
                ) -> ::core::pin::Pin<::std::boxed::Box<
                    dyn ::core::future::Future<Output = #p::BatchResult<Self::Request>> + ::core::marker::Send + 'static,
                >> {
                    #body
                }

                #request_type_fn
                #timeout_fn
                #state_fn
            }
        };
    }))
}
