//! The `#[task]` and `#[flow]` attributes of Kiln. Use them through the `kiln` crate.
//!
//! Each attribute turns `fn name(args) -> R` into a value `name` of a type also called
//! `name`: calling it (`name(args)`) gives a call to `.await` (or `.wait()`), and its methods
//! `with_options`, `call` and, for tasks, `submit` and `map` start runs in other ways. The
//! original body becomes the private associated function `__kiln_body`; the generated code
//! is plain Rust around it (`cargo expand` shows it).

mod options;

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, Pat, ReturnType, Type};

use options::Options;

/// Marks a function as a Kiln task. See the `kiln` crate for the options.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Task, attr.into(), item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Marks a function as a Kiln flow. See the `kiln` crate for the options.
#[proc_macro_attribute]
pub fn flow(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Flow, attr.into(), item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Task,
    Flow,
}

impl Kind {
    fn attr(self) -> &'static str {
        match self {
            Kind::Task => "#[task]",
            Kind::Flow => "#[flow]",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            Kind::Task => "tasks",
            Kind::Flow => "flows",
        }
    }
}

struct Param {
    name: syn::Ident,
    ty: Type,
}

fn expand(kind: Kind, attr: Tokens, item: Tokens) -> syn::Result<Tokens> {
    let opts = Options::parse(attr)?;
    let func: ItemFn = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("{} goes on a function (`fn` or `async fn`)", kind.attr()),
        )
    })?;
    check_signature(kind, &func)?;
    let params = params(kind, &func)?;
    let param_names: Vec<String> = params.iter().map(|p| p.name.to_string()).collect();
    opts.check_storage_key(&param_names)?;
    opts.check_cache(&param_names)?;
    // The task_source policy: a hash of the function as written (its tokens).
    let source_hash = blake3::hash(quote!(#func).to_string().as_bytes()).to_hex().to_string();

    let ident = &func.sig.ident;
    let vis = &func.vis;
    let fn_name = ident.to_string();
    let is_async = func.sig.asyncness.is_some();
    let docs: Vec<_> = func.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
    let is_result = returns_result(&func.sig.output);
    let ret: Type = match &func.sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    let (out_ty, err_ty) = if is_result {
        (
            quote!(<#ret as ::kiln::__private::Outcome>::Ok),
            quote!(<#ret as ::kiln::__private::Outcome>::Err),
        )
    } else {
        (quote!(#ret), quote!(::kiln::Error))
    };

    let names: Vec<_> = params.iter().map(|p| &p.name).collect();
    let types: Vec<_> = params.iter().map(|p| &p.ty).collect();
    let name_strs: Vec<_> = names.iter().map(|n| n.to_string()).collect();
    let indices: Vec<_> = (0..params.len()).map(syn::Index::from).collect();

    // The original function, renamed, private, with the user's attributes.
    let mut body_fn = func.clone();
    body_fn.sig.ident = format_ident!("__kiln_body");
    body_fn.vis = syn::Visibility::Inherited;
    body_fn.attrs.retain(|a| !a.path().is_ident("doc"));

    let finish = if is_result {
        quote!(::kiln::__private::Outcome::into_result)
    } else {
        quote!(::core::result::Result::Ok::<_, ::kiln::Error>)
    };
    let run_body = if is_async {
        quote!(::std::boxed::Box::pin(async move { #finish(Self::__kiln_body(#(#names),*).await) }))
    } else {
        quote!(::std::boxed::Box::pin(::kiln::__private::blocking(move || #finish(Self::__kiln_body(#(#names),*)))))
    };
    let defaults = opts.builder();
    let serializer = match opts.serializer() {
        Some(expr) => quote_spanned! {expr.span()=>
            ::core::option::Option::Some(::kiln::__private::serializer_for::<#out_ty, _>(#expr))
        },
        None => quote! {
            use ::kiln::__private::{NoSerde as _, ViaSerde as _};
            (&&::kiln::__private::TypeProbe::<#out_ty>::new()).kiln_serializer(__kiln_default)
        },
    };
    let run_name = opts.name().map_or_else(|| quote!(#fn_name), |n| quote!(#n));

    let call_ty = match kind {
        Kind::Task => quote!(::kiln::TaskCall),
        Kind::Flow => quote!(::kiln::FlowCall),
    };
    let kind_methods = match kind {
        Kind::Task => {
            let map = match params.len() {
                0 => quote!(),
                1 => {
                    let t = types[0];
                    quote! {
                        /// Submits one task run per item (each a value or a `TaskFuture`).
                        #vis fn map<__KilnItems>(&self, __kiln_items: __KilnItems) -> ::std::vec::Vec<::kiln::TaskFuture<#out_ty>>
                        where
                            __KilnItems: ::core::iter::IntoIterator,
                            __KilnItems::Item: ::kiln::Input<#t>,
                        {
                            __kiln_items.into_iter().map(|__kiln_item| self.submit(__kiln_item)).collect()
                        }
                    }
                }
                _ => quote! {
                    /// Submits one task run per tuple of arguments.
                    #vis fn map<__KilnItems>(&self, __kiln_items: __KilnItems) -> ::std::vec::Vec<::kiln::TaskFuture<#out_ty>>
                    where
                        __KilnItems: ::core::iter::IntoIterator<Item = (#(#types,)*)>,
                    {
                        __kiln_items.into_iter().map(|(#(#names,)*)| self.submit(#(#names),*)).collect()
                    }
                },
            };
            quote! {
                /// A call with these options applied; `.await` it, `.submit()` it or `.wait()` for it.
                #[allow(unused_imports)]
                #vis fn call(&self, #(#names: impl ::kiln::Input<#types>),*) -> ::kiln::TaskCall<Self> {
                    use ::kiln::__private::{PreviewNone as _, PreviewSerialize as _};
                    let __kiln_args = (#(::kiln::Input::into_arg(#names),)*);
                    // The values given, as recorded with the run (`kiln runs show`).
                    let __kiln_previews = ::std::vec![#(
                        match __kiln_args.#indices.value() {
                            ::core::option::Option::Some(__kiln_v) => {
                                (&&::kiln::__private::Probe::<#types>(__kiln_v)).kiln_preview()
                            }
                            ::core::option::Option::None => ::core::option::Option::None,
                        }
                    ),*];
                    ::kiln::TaskCall::new(::core::clone::Clone::clone(self), __kiln_args).with_previews(__kiln_previews)
                }

                /// Starts a task run concurrently; arguments may be values or `TaskFuture`s.
                #vis fn submit(&self, #(#names: impl ::kiln::Input<#types>),*) -> ::kiln::TaskFuture<#out_ty> {
                    self.call(#(#names),*).submit()
                }

                #map
            }
        }
        Kind::Flow => quote! {
            /// A call with these options applied; `.await` it or `.wait()` for it.
            #vis fn call(&self, #(#names: #types),*) -> ::kiln::FlowCall<Self> {
                ::kiln::FlowCall::new(::core::clone::Clone::clone(self), (#(#names,)*))
            }
        },
    };
    let kind_impl = match kind {
        Kind::Task => quote! {
            impl<const __KILN_CONFIGURED: bool> ::kiln::Task for #ident<__KILN_CONFIGURED> {
                type Inputs = (#(::kiln::__private::Arg<#types>,)*);
                const ARG_NAMES: &'static [&'static str] = &[#(#name_strs),*];

                #[allow(unused_variables, unused_imports)]
                fn remote_inputs(__kiln_args: Self::Args, __kiln_default: &str) -> ::std::vec::Vec<::kiln::__private::RemoteInput> {
                    use ::kiln::__private::probe::{NoInput as _, ViaImageInput as _, ViaSerdeInput as _};
                    // By position, not by name: a parameter may be named like a constant.
                    ::std::vec![#(::kiln::__private::RemoteInput::new(
                        #name_strs,
                        __kiln_args.#indices,
                        (&&&::kiln::__private::TypeProbe::<#types>::new()).kiln_input_serializer(__kiln_default),
                    )),*]
                }

                #[allow(unused_variables, unused_imports)]
                fn remote_args(
                    __kiln_inputs: ::kiln::__private::LoadedInputs,
                ) -> ::kiln::__private::BoxFuture<'static, ::core::result::Result<Self::Args, ::std::string::String>> {
                    ::std::boxed::Box::pin(async move {
                        use ::kiln::__private::probe::{NoInput as _, ViaImageInput as _, ViaSerdeInput as _};
                        ::core::result::Result::Ok((#(
                            __kiln_inputs
                                .take::<#types>(#name_strs, |__kiln_s| {
                                    (&&&::kiln::__private::TypeProbe::<#types>::new()).kiln_input_serializer(__kiln_s)
                                })
                                .await?,
                        )*))
                    })
                }
            }
        },
        Kind::Flow => quote! {
            impl<const __KILN_CONFIGURED: bool> ::kiln::Flow for #ident<__KILN_CONFIGURED> {
                const ARG_NAMES: &'static [&'static str] = &[#(#name_strs),*];

                #[allow(unused_imports)]
                fn parameter_schema() -> ::kiln::__private::serde_json::Value {
                    use ::kiln::__private::{NoJsonSchema as _, ViaJsonSchema as _};
                    ::kiln::__private::parameter_schema(&[#(
                        (#name_strs, (&&::kiln::__private::TypeProbe::<#types>::new()).kiln_schema())
                    ),*])
                }
            }
        },
    };
    let what = match kind {
        Kind::Task => "task",
        Kind::Flow => "flow",
    };
    // Tasks register themselves, so a worker finds them by key (runs in a pool).
    let registry = match kind {
        Kind::Task => quote! {
            ::kiln::__private::inventory::submit! {
                ::kiln::__private::RemoteTask {
                    key: <#ident as ::kiln::Body>::KEY,
                    run: {
                        fn __kiln_remote(
                            engine: ::kiln::Engine,
                            claim: ::kiln::store::work::Claim,
                            cancel: ::kiln::__private::CancelReceiver,
                        ) -> ::kiln::__private::BoxFuture<'static, ()> {
                            ::kiln::__private::run_remote(#ident, engine, claim, cancel)
                        }
                        __kiln_remote
                    },
                }
            }
        },
        Kind::Flow => quote!(),
    };
    let struct_doc = format!(
        "The {what} `{fn_name}`. Call it like the function (`{fn_name}(...)`) and `.await` the call; \
         `with_options` gives a copy with other options."
    );

    Ok(quote_spanned! {ident.span()=>
        #(#docs)*
        #[doc = ""]
        #[doc = #struct_doc]
        #[allow(non_camel_case_types, clippy::type_complexity)]
        #vis struct #ident<const __KILN_CONFIGURED: bool = false> {
            __kiln_options: ::core::option::Option<::kiln::__private::Arc<::kiln::Options<#err_ty>>>,
        }

        #(#docs)*
        #[allow(non_upper_case_globals)]
        #vis const #ident: #ident = #ident { __kiln_options: ::core::option::Option::None };

        impl<const __KILN_CONFIGURED: bool> ::core::clone::Clone for #ident<__KILN_CONFIGURED> {
            fn clone(&self) -> Self {
                #ident { __kiln_options: ::core::clone::Clone::clone(&self.__kiln_options) }
            }
        }

        impl<const __KILN_CONFIGURED: bool> ::core::fmt::Debug for #ident<__KILN_CONFIGURED> {
            fn fmt(&self, __kiln_f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                __kiln_f.debug_struct(#fn_name).field("options", &::kiln::Body::options(self)).finish()
            }
        }

        #[allow(dead_code, clippy::type_complexity)]
        impl<const __KILN_CONFIGURED: bool> #ident<__KILN_CONFIGURED> {
            #[allow(clippy::too_many_arguments)]
            #body_fn

            /// This with `options` set over the current ones (fields left unset keep their value).
            /// Call the result with `.call(...)`.
            #vis fn with_options(&self, __kiln_new: ::kiln::Options<#err_ty>) -> #ident<true> {
                let __kiln_current = ::kiln::Body::options(self);
                #ident { __kiln_options: ::core::option::Option::Some(::kiln::__private::Arc::new(__kiln_new.over(&__kiln_current))) }
            }

            #kind_methods
        }

        impl #ident<false> {
            fn __kiln_direct(#(#names: #types),*) -> #call_ty<#ident> {
                #ident.call(#(#names),*)
            }
        }

        #[allow(clippy::type_complexity)]
        impl ::core::ops::Deref for #ident<false> {
            type Target = fn(#(#types),*) -> #call_ty<#ident>;
            fn deref(&self) -> &Self::Target {
                const __KILN_DIRECT: fn(#(#types),*) -> #call_ty<#ident> = #ident::__kiln_direct;
                &__KILN_DIRECT
            }
        }

        #[allow(clippy::type_complexity)]
        impl<const __KILN_CONFIGURED: bool> ::kiln::Body for #ident<__KILN_CONFIGURED> {
            type Args = (#(#types,)*);
            type Output = #out_ty;
            type Error = #err_ty;
            const NAME: &'static str = #run_name;
            const KEY: &'static str = ::core::concat!(::core::module_path!(), "::", #fn_name);

            fn options(&self) -> ::kiln::__private::Arc<::kiln::Options<#err_ty>> {
                static __KILN_DEFAULTS: ::kiln::__private::OnceLock<::kiln::__private::Arc<::kiln::Options<#err_ty>>> =
                    ::kiln::__private::OnceLock::new();
                match &self.__kiln_options {
                    ::core::option::Option::Some(__kiln_o) => ::core::clone::Clone::clone(__kiln_o),
                    ::core::option::Option::None => ::kiln::__private::defaults(&__KILN_DEFAULTS, #run_name, || #defaults),
                }
            }

            #[allow(unused_variables)]
            fn run(__kiln_args: Self::Args) -> ::kiln::__private::BoxFuture<'static, ::core::result::Result<#out_ty, #err_ty>> {
                let (#(#names,)*) = __kiln_args;
                #run_body
            }

            #[allow(unused_imports)]
            fn clone_args(__kiln_args: &Self::Args) -> ::core::option::Option<Self::Args> {
                use ::kiln::__private::{NoClone as _, ViaClone as _};
                (&&::kiln::__private::Probe(__kiln_args)).kiln_clone()
            }

            #[allow(unused_variables, unused_imports, unused_mut)]
            fn parameters(__kiln_args: &Self::Args) -> ::kiln::__private::serde_json::Value {
                use ::kiln::__private::{ViaSerialize as _, ViaTypeName as _};
                let mut __kiln_map = ::kiln::__private::serde_json::Map::new();
                #(__kiln_map.insert(::std::string::String::from(#name_strs), (&&::kiln::__private::Probe(&__kiln_args.#indices)).kiln_param());)*
                ::kiln::__private::serde_json::Value::Object(__kiln_map)
            }

            const SOURCE_HASH: &'static str = #source_hash;

            #[allow(unused_variables, unused_imports)]
            fn input_hashes(__kiln_args: &Self::Args) -> ::std::vec::Vec<(&'static str, ::kiln::cache::InputHash)> {
                use ::kiln::__private::{NoHash as _, ViaImageHash as _, ViaSerdeHash as _};
                ::std::vec![#((#name_strs, (&&&::kiln::__private::Probe(&__kiln_args.#indices)).kiln_hash())),*]
            }

            #[allow(unused_variables, unused_imports)]
            fn serializer(
                &self,
                __kiln_default: &str,
            ) -> ::core::option::Option<::kiln::__private::Arc<dyn ::kiln::serializer::Serializer<#out_ty>>> {
                #serializer
            }

            #[allow(unused_imports)]
            fn describe_error(__kiln_error: &Self::Error) -> ::std::string::String {
                use ::kiln::__private::{ViaDisplay as _, ViaKnownError as _, ViaStdError as _};
                (&&&::kiln::__private::Probe(__kiln_error)).kiln_chain()
            }
        }

        #kind_impl

        #registry
    })
}

fn check_signature(kind: Kind, func: &ItemFn) -> syn::Result<()> {
    let sig = &func.sig;
    let attr = kind.attr();
    if let Some(c) = &sig.constness {
        return Err(syn::Error::new(c.span(), format!("{attr} cannot go on a `const fn`")));
    }
    if let syn::Safety::Unsafe(u) = &sig.safety {
        return Err(syn::Error::new(u.span(), format!("{attr} cannot go on an `unsafe fn`")));
    }
    if let Some(abi) = &sig.abi {
        return Err(syn::Error::new(
            abi.span(),
            format!("{attr} cannot go on an `extern` function"),
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(
            v.span(),
            format!("{attr} cannot go on a variadic function"),
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            format!(
                "{} cannot be generic: each {attr} function is registered under one name with concrete types; \
                 write one function per type, or take a trait object",
                kind.plural()
            ),
        ));
    }
    Ok(())
}

fn params(kind: Kind, func: &ItemFn) -> syn::Result<Vec<Param>> {
    let mut out = Vec::new();
    for (i, arg) in func.sig.inputs.iter().enumerate() {
        let typed = match arg {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    format!(
                        "{} goes on a free function, not a method: `self` cannot be moved into a run",
                        kind.attr()
                    ),
                ));
            }
            FnArg::Typed(t) => t,
        };
        check_type(kind, &typed.ty)?;
        let name = match &*typed.pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => p.ident.clone(),
            _ => format_ident!("arg{}", i),
        };
        out.push(Param {
            name,
            ty: (*typed.ty).clone(),
        });
    }
    Ok(out)
}

fn check_type(kind: Kind, ty: &Type) -> syn::Result<()> {
    match ty {
        Type::Reference(r) => Err(syn::Error::new(
            r.span(),
            format!(
                "arguments of {} are moved into the run, which may outlive the caller: take an owned type \
                 (`String` for `&str`, `Vec<T>` for `&[T]`, `Arc<T>` to share)",
                kind.plural()
            ),
        )),
        Type::ImplTrait(t) => Err(syn::Error::new(
            t.span(),
            format!("arguments of {} need a concrete type, not `impl Trait`", kind.plural()),
        )),
        Type::Paren(p) => check_type(kind, &p.elem),
        Type::Group(g) => check_type(kind, &g.elem),
        _ => Ok(()),
    }
}

/// `Result<..>` under any path (`anyhow::Result<T>`, `io::Result<T>`, `Result<T, E>`).
fn returns_result(output: &ReturnType) -> bool {
    match output {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(p) => p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == "Result"),
            _ => false,
        },
        ReturnType::Default => false,
    }
}
