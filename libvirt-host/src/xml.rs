//! A small element tree over quick-xml for reading libvirt's XML documents (domains, volumes, snapshots,
//! capabilities), and escaping for the documents we write.

use quick_xml::events::Event;

/// One element: its name, attributes, text and child elements.
#[derive(Debug, Default, Clone)]
pub struct Node {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Node>,
}

/// Deepest nesting accepted (libvirt's documents are shallow; this bounds a hostile one).
const MAX_DEPTH: usize = 64;

impl Node {
    /// Parses a document into its root element.
    pub fn parse(xml: &str) -> Result<Node, String> {
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut stack: Vec<Node> = vec![Node::default()];
        loop {
            match reader.read_event().map_err(|e| format!("bad XML from libvirt: {e}"))? {
                Event::Start(e) => {
                    if stack.len() > MAX_DEPTH {
                        return Err("XML from libvirt nests too deeply".into());
                    }
                    stack.push(element(&e)?);
                }
                Event::Empty(e) => {
                    let node = element(&e)?;
                    if let Some(top) = stack.last_mut() {
                        top.children.push(node);
                    }
                }
                Event::End(_) => {
                    let node = stack.pop().ok_or("unbalanced XML from libvirt")?;
                    match stack.last_mut() {
                        Some(top) => top.children.push(node),
                        None => return Err("unbalanced XML from libvirt".into()),
                    }
                }
                Event::Text(t) => {
                    let text = t.decode().map_err(|e| format!("bad XML text from libvirt: {e}"))?;
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&text);
                    }
                }
                Event::GeneralRef(r) => {
                    let name = r.decode().map_err(|e| format!("bad XML reference from libvirt: {e}"))?;
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&resolve_ref(&name));
                    }
                }
                Event::CData(c) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&String::from_utf8_lossy(&c));
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        let mut doc = stack.pop().ok_or("empty XML from libvirt")?;
        if !stack.is_empty() {
            return Err("unbalanced XML from libvirt".into());
        }
        doc.children.pop().ok_or_else(|| "empty XML document from libvirt".into())
    }

    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at `path` below this one (each step the first child of that name).
    pub fn at(&self, path: &[&str]) -> Option<&Node> {
        path.iter().try_fold(self, |node, name| node.child(name))
    }

    /// The trimmed text of the element at `path`.
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        self.at(path).map(|n| n.text.trim())
    }
}

fn element(e: &quick_xml::events::BytesStart<'_>) -> Result<Node, String> {
    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|e| format!("bad XML attribute from libvirt: {e}"))?;
        let key = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| format!("bad XML attribute from libvirt: {e}"))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Node { name, attrs, ..Node::default() })
}

fn resolve_ref(name: &str) -> String {
    match name {
        "lt" => "<".into(),
        "gt" => ">".into(),
        "amp" => "&".into(),
        "quot" => "\"".into(),
        "apos" => "'".into(),
        _ => {
            let code = if let Some(hex) = name.strip_prefix("#x") {
                u32::from_str_radix(hex, 16).ok()
            } else {
                name.strip_prefix('#').and_then(|d| d.parse().ok())
            };
            code.and_then(char::from_u32).map(String::from).unwrap_or_default()
        }
    }
}

/// Escapes text for an XML attribute value or element content.
pub fn esc(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_elements_attributes_and_escaped_text() {
        let doc = Node::parse(
            "<domain type='qemu'><name>a&amp;b</name><devices><disk device='cdrom'><source file='/x y'/>\
             </disk><disk device='disk'/></devices></domain>",
        )
        .unwrap();
        assert_eq!(doc.name, "domain");
        assert_eq!(doc.attr("type"), Some("qemu"));
        assert_eq!(doc.text_at(&["name"]), Some("a&b"));
        let disks: Vec<_> = doc.at(&["devices"]).unwrap().all("disk").collect();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].at(&["source"]).and_then(|s| s.attr("file")), Some("/x y"));
        assert_eq!(esc("<a & 'b'>"), "&lt;a &amp; &apos;b&apos;&gt;");
    }

    #[test]
    fn refuses_broken_and_deep_documents() {
        assert!(Node::parse("<a><b></a>").is_err());
        assert!(Node::parse(&"<a>".repeat(100)).is_err());
        assert!(Node::parse("").is_err());
    }
}
