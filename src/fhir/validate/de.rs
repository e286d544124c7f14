//! A serde `Deserializer` over a borrowed `serde_json::Value` that knows where it is: every error
//! leaves with the element path of the value it arose at, and its kind is classified at once so
//! that no serde message (they quote the value: `invalid value: string "1990-13-45"`) survives.
//!
//! Why not `serde_json::Value`'s own `Deserializer` (with `serde_path_to_error` around it)? With
//! the workspace's `arbitrary_precision` feature, a number whose text is not what `f64` prints
//! (`1.50`, `0.10`, `1e3`) is handed to `deserialize_any` as serde_json's private number map, and
//! serde buffers exactly that way for flattened choice elements (`valueDecimal` of an extension)
//! and for internally tagged enums (`contained` resources): official examples then fail with
//! "invalid type: map, expected f64". Here numbers are always plain `u64`/`i64`/`f64`.
//!
//! It also tells the layers above two things serde hides: which keys the model ignored (unknown
//! elements of structs without choice elements) and which values were buffered for later
//! (choice elements, contained resources), so a failure inside a buffer can be looked at again
//! with a precise path.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{
    self, DeserializeSeed, EnumAccess, Expected, MapAccess, SeqAccess, Unexpected, VariantAccess,
    Visitor,
};
use serde_json::{Map, Value};

use super::IssueCode;

/// One step of an element path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Where a value sits, as a chain of borrowed frames on the stack (nothing is allocated until an
/// issue needs its path).
#[derive(Clone, Copy)]
pub(crate) enum Path<'p> {
    /// The resource's type name and, for a value looked at again on its own, the steps from the
    /// resource down to it.
    Root {
        name: &'p str,
        prefix: &'p [Seg],
    },
    Key(&'p Path<'p>, &'p str),
    Index(&'p Path<'p>, usize),
}

impl Path<'_> {
    pub(crate) fn root(&self) -> &str {
        let mut at = self;
        loop {
            match at {
                Path::Root { name, .. } => return name,
                Path::Key(parent, _) | Path::Index(parent, _) => at = parent,
            }
        }
    }

    /// The steps from the resource down to here.
    pub(crate) fn segments(&self) -> Vec<Seg> {
        let mut rev = Vec::new();
        let mut at = self;
        let prefix = loop {
            match at {
                Path::Root { prefix, .. } => break *prefix,
                Path::Key(parent, key) => {
                    rev.push(Seg::Key((*key).to_owned()));
                    at = parent;
                }
                Path::Index(parent, index) => {
                    rev.push(Seg::Index(*index));
                    at = parent;
                }
            }
        };
        let mut segs = prefix.to_vec();
        segs.extend(rev.into_iter().rev());
        segs
    }

    pub(crate) fn render(&self) -> String {
        render(self.root(), &self.segments())
    }
}

/// The FHIRPath-style expression: `Patient.name[0].given[1]`. A primitive's extension container
/// `_birthDate` is the element itself in FHIRPath, so `_birthDate.extension[0]` reads
/// `birthDate.extension[0]`; only a path ending at the container keeps its JSON name.
pub(crate) fn render(root: &str, segs: &[Seg]) -> String {
    let mut out = String::from(root);
    for (i, seg) in segs.iter().enumerate() {
        match seg {
            Seg::Key(key) => {
                out.push('.');
                let last = i + 1 == segs.len();
                match key.strip_prefix('_') {
                    Some(element) if !last && !element.is_empty() => out.push_str(element),
                    _ => out.push_str(key),
                }
            }
            Seg::Index(index) => {
                out.push('[');
                out.push_str(&index.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// What went wrong, in words that never include the submitted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The JSON type is not the element's.
    WrongType {
        expected: &'static str,
        got: &'static str,
    },
    /// A code outside the required value set (fhir-sdk's code enums: "Unknown value: ...").
    BadCode,
    /// Not a FHIR date or dateTime.
    BadDate,
    /// Not a FHIR instant or time.
    BadInstantOrTime,
    BadBase64,
    /// positiveInt 0, unsignedInt below 0, an integer beyond 32 bits.
    OutOfRange,
    /// A required element is absent: the field name, from the model (never from the client).
    Missing(&'static str),
    /// A required choice element (`value[x]`) is absent: the Rust name of its enum.
    MissingChoice(String),
    Unknown,
    /// Anything else a model refused.
    Invalid,
}

impl Kind {
    /// The OperationOutcome issue code and the diagnostics.
    pub(crate) fn describe(&self) -> (IssueCode, String) {
        match self {
            Kind::WrongType { expected, got } => (
                IssueCode::Structure,
                format!("expected {expected}, got {got}"),
            ),
            Kind::BadCode => (
                IssueCode::CodeInvalid,
                "not a code of the required value set".into(),
            ),
            Kind::BadDate => (
                IssueCode::Value,
                "not a valid date (YYYY, YYYY-MM or YYYY-MM-DD) or dateTime (a date, or \
                 YYYY-MM-DDThh:mm:ss with a time zone)"
                    .into(),
            ),
            Kind::BadInstantOrTime => (
                IssueCode::Value,
                "not a valid instant (YYYY-MM-DDThh:mm:ss with a time zone) or time (hh:mm:ss)"
                    .into(),
            ),
            Kind::BadBase64 => (IssueCode::Value, "not valid base64".into()),
            Kind::OutOfRange => (
                IssueCode::Value,
                "a number out of range for this element".into(),
            ),
            Kind::Missing(_) | Kind::MissingChoice(_) => {
                (IssueCode::Required, "a required element is missing".into())
            }
            Kind::Unknown => (IssueCode::Structure, "unknown element".into()),
            Kind::Invalid => (
                IssueCode::Value,
                "not a valid value for this element".into(),
            ),
        }
    }
}

/// A deserialization error: its kind and, once it has left the value it arose at, that
/// value's path.
#[derive(Debug)]
pub(crate) struct Error {
    pub kind: Kind,
    /// The steps from the resource to the value.
    pub path: Option<Vec<Seg>>,
    /// The error came out of a value that serde had buffered whole (a contained resource, say),
    /// so the path is where the buffer began, not where the fault is.
    pub buffered: bool,
    /// The error came out of an object after all its entries (a flattened choice element failed,
    /// or a required one is missing): the keys whose values serde had buffered.
    pub buffered_keys: Vec<String>,
}

impl Error {
    fn new(kind: Kind) -> Self {
        Error {
            kind,
            path: None,
            buffered: false,
            buffered_keys: Vec::new(),
        }
    }

    /// Gives the error `path` unless it already has a deeper one.
    pub(crate) fn located(mut self, path: &Path<'_>, buffered: bool) -> Self {
        if self.path.is_none() {
            self.path = Some(path.segments());
            self.buffered = buffered;
        }
        self
    }
}

impl fmt::Display for Error {
    // Only what `describe` says: never a serde message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kind.describe().1)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        // Read once to classify, then dropped: these messages may quote the value.
        Error::new(classify_custom(&msg.to_string()))
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Error::new(Kind::WrongType {
            expected: expected_json(&exp.to_string()),
            got: got_json(&unexp),
        })
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        let expected = exp.to_string();
        Error::new(match unexp {
            Unexpected::Unsigned(_) | Unexpected::Signed(_) | Unexpected::Float(_) => {
                Kind::OutOfRange
            }
            // A number visitor given a string, say: a wrong type rather than a wrong value.
            _ if expected_json(&expected) == "a number" => Kind::WrongType {
                expected: "a number",
                got: got_json(&unexp),
            },
            _ => Kind::Invalid,
        })
    }

    fn unknown_variant(_variant: &str, _expected: &'static [&'static str]) -> Self {
        Error::new(Kind::BadCode)
    }

    fn unknown_field(_field: &str, _expected: &'static [&'static str]) -> Self {
        Error::new(Kind::Unknown)
    }

    fn missing_field(field: &'static str) -> Self {
        Error::new(Kind::Missing(field))
    }
}

/// Sorts a serde custom message into a kind; the text itself goes no further.
fn classify_custom(msg: &str) -> Kind {
    // fhir-sdk's code enums (`FromStr`: "Unknown value: {s}").
    if msg.starts_with("Unknown value:") {
        return Kind::BadCode;
    }
    // serde, for a flattened enum that is not optional: a required choice element is absent.
    if let Some(rest) = msg.strip_prefix("no variant of enum ") {
        let name = rest.split(' ').next().unwrap_or_default();
        return Kind::MissingChoice(name.to_owned());
    }
    // fhir-sdk's `DateFormatError` (Date and DateTime).
    const DATE: [&str; 5] = [
        "Couldn't parse date",
        "Invalid month",
        "Couldn't parse string to integer",
        "Couldn't split string",
        "Invalid date format",
    ];
    if DATE.iter().any(|p| msg.starts_with(p)) {
        return Kind::BadDate;
    }
    // The time crate's parse errors (Instant through RFC 3339, and Time).
    const TIME: [&str; 6] = [
        "component could not be parsed",
        "character literal was not valid",
        "unexpected trailing characters",
        "must be in the range",
        "insufficient to construct",
        "not long enough",
    ];
    if TIME.iter().any(|p| msg.contains(p)) {
        return Kind::BadInstantOrTime;
    }
    // The base64 crate (Base64Binary).
    const BASE64: [&str; 4] = [
        "Invalid symbol",
        "Invalid input length",
        "Invalid last symbol",
        "Invalid padding",
    ];
    if BASE64.iter().any(|p| msg.starts_with(p)) || msg.contains("6-bit remainder") {
        return Kind::BadBase64;
    }
    Kind::Invalid
}

/// What a visitor expected, in JSON's words.
fn expected_json(exp: &str) -> &'static str {
    if exp.contains("sequence") || exp.contains("array") {
        "an array"
    } else if exp.starts_with("struct ") || exp.contains("map") {
        "an object"
    } else if exp.contains("boolean") {
        "a boolean"
    } else if exp.contains("string") || exp.contains("OffsetDateTime") {
        "a string"
    } else if exp.contains("nonzero") {
        "a positive integer"
    } else if ["u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64"].contains(&exp)
        || exp.contains("integer")
    {
        "an integer"
    } else if exp == "f64" || exp == "f32" || exp.contains("float") {
        "a number"
    } else {
        "another JSON type"
    }
}

fn got_json(unexp: &Unexpected<'_>) -> &'static str {
    match unexp {
        Unexpected::Bool(_) => "a boolean",
        Unexpected::Unsigned(_) | Unexpected::Signed(_) => "an integer",
        Unexpected::Float(_) => "a decimal number",
        Unexpected::Str(_) | Unexpected::Char(_) => "a string",
        Unexpected::Seq => "an array",
        Unexpected::Map => "an object",
        Unexpected::Unit | Unexpected::Option => "null",
        _ => "another JSON type",
    }
}

/// What one typed check learns besides its result.
#[derive(Default)]
pub(crate) struct Ctx {
    /// Paths of keys the model ignored (unknown elements of structs without choice elements).
    pub ignored: RefCell<Vec<Vec<Seg>>>,
}

/// FHIR element names are `[A-Za-z][A-Za-z0-9]*`; a `_` before one names its primitive's
/// extension holder. Only keys of this shape are ever put into an expression: a key is the
/// client's text too.
pub(crate) fn is_element_name(key: &str) -> bool {
    let name = key.strip_prefix('_').unwrap_or(key);
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
}

/// How the value at hand is held, so buffering and ignoring can be noticed.
#[derive(Clone, Copy)]
enum Role<'p> {
    Root,
    /// An array item or object entry: `any` is set when serde buffers it whole.
    Child {
        any: &'p Cell<bool>,
        entry: bool,
    },
}

pub(crate) struct ValueDe<'de, 'p> {
    value: &'de Value,
    path: &'p Path<'p>,
    ctx: &'p Ctx,
    role: Role<'p>,
}

impl<'de, 'p> ValueDe<'de, 'p> {
    pub(crate) fn new(value: &'de Value, path: &'p Path<'p>, ctx: &'p Ctx) -> Self {
        ValueDe {
            value,
            path,
            ctx,
            role: Role::Root,
        }
    }

    fn any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else if let Some(f) = n.as_f64() {
                    visitor.visit_f64(f)
                } else {
                    // Beyond f64 (1e400): no FHIR number is that large.
                    Err(Error::new(Kind::OutOfRange))
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => self.seq(items, visitor),
            Value::Object(map) => self.map(map, visitor),
        }
    }

    fn seq<V: Visitor<'de>>(self, items: &'de [Value], visitor: V) -> Result<V::Value, Error> {
        let mut access = SeqDe {
            iter: items.iter().enumerate(),
            path: self.path,
            ctx: self.ctx,
        };
        let out = visitor.visit_seq(&mut access)?;
        if access.iter.len() == 0 {
            Ok(out)
        } else {
            Err(Error::new(Kind::Invalid))
        }
    }

    fn map<V: Visitor<'de>>(
        self,
        map: &'de Map<String, Value>,
        visitor: V,
    ) -> Result<V::Value, Error> {
        let mut access = MapDe {
            iter: map.iter(),
            pending: None,
            path: self.path,
            ctx: self.ctx,
            buffered: Vec::new(),
        };
        visitor.visit_map(&mut access).map_err(|mut e| {
            if e.path.is_none() {
                e.buffered_keys = access.buffered.iter().map(|k| (*k).to_owned()).collect();
                e.located(self.path, false)
            } else {
                e
            }
        })
    }
}

macro_rules! forward_to_any {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.any(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for ValueDe<'de, '_> {
    type Error = Error;

    /// serde asks for "anything" when it buffers a value for later (choice elements, tagged
    /// enums); typed requests go straight to `any`.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if let Role::Child { any, .. } = self.role {
            any.set(true);
        }
        self.any(visitor)
    }

    forward_to_any! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_unit deserialize_seq
        deserialize_map deserialize_identifier
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.any(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.any(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.any(visitor)
    }

    /// Only an object: serde's derived structs would also read an array as a tuple of fields.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            Value::Object(_) => self.any(visitor),
            other => Err(Error::new(Kind::WrongType {
                expected: "an object",
                got: json_kind(other),
            })),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            Value::String(s) => visitor.visit_enum(BorrowedStrDeserializer::<Error>::new(s)),
            Value::Object(map) if map.len() == 1 => {
                let Some((variant, value)) = map.iter().next() else {
                    unreachable!("a map of one entry has an entry")
                };
                visitor.visit_enum(EnumDe {
                    variant,
                    value,
                    path: self.path,
                    ctx: self.ctx,
                })
            }
            other => Err(Error::new(Kind::WrongType {
                expected: "a string or an object of one element",
                got: json_kind(other),
            })),
        }
    }

    /// The model has no such field: an unknown element (objects under a choice element's
    /// struct are not seen here; the round trip finds those).
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if let Role::Child { entry: true, .. } = self.role {
            self.ctx.ignored.borrow_mut().push(self.path.segments());
        }
        visitor.visit_unit()
    }
}

/// The JSON type of a value, in the words of `got_json`.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "an integer",
        Value::Number(_) => "a decimal number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct SeqDe<'de, 'p> {
    iter: std::iter::Enumerate<std::slice::Iter<'de, Value>>,
    path: &'p Path<'p>,
    ctx: &'p Ctx,
}

impl<'de> SeqAccess<'de> for SeqDe<'de, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some((index, value)) = self.iter.next() else {
            return Ok(None);
        };
        let path = Path::Index(self.path, index);
        let any = Cell::new(false);
        let de = ValueDe {
            value,
            path: &path,
            ctx: self.ctx,
            role: Role::Child {
                any: &any,
                entry: false,
            },
        };
        seed.deserialize(de)
            .map(Some)
            .map_err(|e| e.located(&path, any.get()))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct MapDe<'de, 'p> {
    iter: serde_json::map::Iter<'de>,
    pending: Option<(&'de str, &'de Value)>,
    path: &'p Path<'p>,
    ctx: &'p Ctx,
    /// Keys whose values serde buffered (choice elements and, in structs with choice
    /// elements, unknown keys).
    buffered: Vec<&'de str>,
}

impl<'de> MapAccess<'de> for MapDe<'de, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        self.pending = Some((key, value));
        seed.deserialize(BorrowedStrDeserializer::<Error>::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let Some((key, value)) = self.pending.take() else {
            return Err(Error::new(Kind::Invalid));
        };
        let path = Path::Key(self.path, key);
        let any = Cell::new(false);
        let de = ValueDe {
            value,
            path: &path,
            ctx: self.ctx,
            role: Role::Child {
                any: &any,
                entry: true,
            },
        };
        let out = seed
            .deserialize(de)
            .map_err(|e| e.located(&path, any.get()));
        if any.get() {
            self.buffered.push(key);
        }
        out
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// An object of one entry read as an externally tagged enum variant.
struct EnumDe<'de, 'p> {
    variant: &'de str,
    value: &'de Value,
    path: &'p Path<'p>,
    ctx: &'p Ctx,
}

impl<'de, 'p> EnumAccess<'de> for EnumDe<'de, 'p> {
    type Error = Error;
    type Variant = VariantDe<'de, 'p>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Error> {
        let variant = seed.deserialize(BorrowedStrDeserializer::<Error>::new(self.variant))?;
        Ok((
            variant,
            VariantDe {
                key: self.variant,
                value: self.value,
                path: self.path,
                ctx: self.ctx,
            },
        ))
    }
}

struct VariantDe<'de, 'p> {
    key: &'de str,
    value: &'de Value,
    path: &'p Path<'p>,
    ctx: &'p Ctx,
}

impl<'de> VariantDe<'de, '_> {
    fn with<R>(self, f: impl FnOnce(ValueDe<'de, '_>) -> Result<R, Error>) -> Result<R, Error> {
        let path = Path::Key(self.path, self.key);
        f(ValueDe::new(self.value, &path, self.ctx)).map_err(|e| e.located(&path, false))
    }
}

impl<'de> VariantAccess<'de> for VariantDe<'de, '_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        Err(Error::new(Kind::WrongType {
            expected: "a string",
            got: "an object",
        }))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        self.with(|de| seed.deserialize(de))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.with(|de| de::Deserializer::deserialize_seq(de, visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.with(|de| de::Deserializer::deserialize_map(de, visitor))
    }
}
