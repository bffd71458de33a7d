//! The OpenAPI 3.1 document `GET /api/v1/openapi.json` serves: the contract of the host API. Paths come
//! from the table below (kept beside the router; a test checks that both list the same routes); schemas
//! are generated from the `porthole-api` types by schemars, so they cannot drift from the code.

use serde_json::{Value, json};

/// (method, path under /api/v1, summary, least role, request body schema, success status, response schema)
pub type Route =
    (&'static str, &'static str, &'static str, &'static str, Option<&'static str>, u16, Option<&'static str>);

pub const ROUTES: &[Route] = &[
    ("get", "/host", "What the host is and holds", "viewer", None, 200, Some("HostInfo")),
    (
        "get",
        "/host/stats",
        "The host's samples (CPU of every core, memory in use, its VMs' I/O) newer than ?since; ?resolution=s|min",
        "viewer",
        None,
        200,
        Some("Stats"),
    ),
    ("get", "/openapi.json", "This document", "none", None, 200, None),
    ("get", "/vms", "The VMs the caller may see", "viewer", None, 200, Some("VmList")),
    ("post", "/vms", "Create a VM (and its disk)", "admin", Some("CreateVm"), 201, Some("Vm")),
    ("get", "/vms/{id}", "One VM", "viewer", None, 200, Some("Vm")),
    (
        "patch",
        "/vms/{id}",
        "Change a VM's settings. Every field is checked first; refused fields answer 400 `invalid` with \
         `fields` (each field's reason) and change nothing. Name, tags, description and autostart change at \
         once, and so does a running VM's memory in use by the guest (`memory_target_mib`, through its \
         balloon), its vCPUs when more are asked for within its `max_vcpus` (hot-added) and its user cards' port \
         forwards when nothing else of its cards changes (a new passt; 409 `engine` when it cannot open them); \
         on a running or suspended VM the hardware, boot settings, display, disk size and network \
         cards are kept as `pending` (`pending_changes` names them) and apply at its next start",
        "admin",
        Some("UpdateVm"),
        200,
        Some("Vm"),
    ),
    ("delete", "/vms/{id}", "Delete a stopped VM and its disk", "admin", None, 204, None),
    ("post", "/vms/{id}/start", "Start; returns once the VM runs", "operator", None, 200, Some("Vm")),
    (
        "post",
        "/vms/{id}/shutdown",
        "ACPI power button, forced off after ?timeout_s (default 30); a task",
        "operator",
        None,
        202,
        Some("Task"),
    ),
    ("post", "/vms/{id}/poweroff", "Pull the plug", "operator", None, 200, Some("Vm")),
    ("post", "/vms/{id}/reset", "Reset button", "operator", None, 200, Some("Vm")),
    ("post", "/vms/{id}/pause", "Stop every vCPU", "operator", None, 200, Some("Vm")),
    ("post", "/vms/{id}/resume", "Continue", "operator", None, 200, Some("Vm")),
    (
        "post",
        "/vms/{id}/suspend",
        "Save the running VM's state to disk and end its process (state suspended); start resumes it",
        "operator",
        None,
        200,
        Some("Vm"),
    ),
    (
        "get",
        "/vms/{id}/snapshots",
        "The VM's snapshot tree and where Now hangs in it",
        "viewer",
        None,
        200,
        Some("SnapshotTree"),
    ),
    (
        "post",
        "/vms/{id}/snapshots",
        "Take a snapshot (a running VM: with its machine state); a task whose result is the snapshot's id",
        "operator",
        Some("TakeSnapshot"),
        202,
        Some("Task"),
    ),
    (
        "post",
        "/vms/{id}/snapshots/{sid}/revert",
        "Revert the VM's disk (and, for a snapshot with state, its running machine) to a snapshot; a task",
        "operator",
        Some("RevertSnapshot"),
        202,
        Some("Task"),
    ),
    (
        "delete",
        "/vms/{id}/snapshots/{sid}",
        "Delete a snapshot (its layer merges into its single child layer); a task with progress",
        "operator",
        None,
        202,
        Some("Task"),
    ),
    (
        "post",
        "/vms/{id}/clone",
        "Clone a stopped VM or template (full: sparse copy; linked: an overlay on its disk); a task whose result is the new VM's id",
        "admin",
        Some("CloneVm"),
        202,
        Some("Task"),
    ),
    (
        "post",
        "/vms/{id}/media",
        "Insert a library image into a CD/DVD drive (drive: cdrom0, cdrom1, …; absent: the first), or eject \
         (image: null); live on a running VM",
        "operator",
        Some("MediaChange"),
        200,
        Some("Vm"),
    ),
    (
        "post",
        "/vms/{id}/disks",
        "Add a disk to a stopped VM without snapshots: new and empty (size_gib, format) or a copy of a library \
         image (image); refused fields answer 400 `invalid` with `fields`; a running VM, one with snapshots or \
         one with the most drives answers 409 with `fields`. Returns the new drive",
        "admin",
        Some("AddDisk"),
        201,
        Some("DriveInfo"),
    ),
    (
        "delete",
        "/vms/{id}/disks/{drive}",
        "Remove a disk (not the boot disk disk0) of a stopped VM without snapshots, and its files",
        "admin",
        None,
        204,
        None,
    ),
    (
        "put",
        "/vms/{id}/disks/{drive}/limits",
        "Set a disk's rate limits (IOPS and bytes/s, in total or per direction; absent: none): a running VM's \
         engine takes them at once",
        "admin",
        Some("DiskLimits"),
        200,
        Some("DriveInfo"),
    ),
    (
        "post",
        "/vms/{id}/disks/{drive}/size",
        "Grow a disk (never shrinks): at once on a stopped or running VM (a running guest is told and sees the \
         new size without a restart); a suspended VM's boot disk at its next start",
        "admin",
        Some("GrowDisk"),
        200,
        Some("DriveInfo"),
    ),
    (
        "post",
        "/vms/{id}/cdroms",
        "Add a CD/DVD drive (empty, or with a library image) to a stopped VM; returns the new drive",
        "admin",
        Some("AddCdrom"),
        201,
        Some("DriveInfo"),
    ),
    (
        "delete",
        "/vms/{id}/cdroms/{drive}",
        "Remove a CD/DVD drive of a stopped VM (not its last one; the later drives move up one place)",
        "admin",
        None,
        204,
        None,
    ),
    (
        "post",
        "/vms/{id}/nics/{nic}/link",
        "Plug in (up: true) or pull the virtual cable of a running VM's network card",
        "operator",
        Some("LinkChange"),
        200,
        Some("NicStatus"),
    ),
    (
        "put",
        "/vms/{id}/nics/{nic}/limits",
        "Set a network card's rate limits in bit/s each way (rx_bps towards the guest, tx_bps from it; absent: \
         none; at least 12112): a running VM's engine takes them at once. Returns the card's definition",
        "admin",
        Some("NicLimits"),
        200,
        Some("NicDefinition"),
    ),
    (
        "post",
        "/vms/{id}/console",
        "A one-shot console ticket (30 s); viewers get view-only consoles",
        "viewer",
        None,
        200,
        Some("ConsoleTicket"),
    ),
    (
        "get",
        "/vms/{id}/serial",
        "The last ?lines (100, at most 1000) of serial output",
        "viewer",
        None,
        200,
        Some("SerialOutput"),
    ),
    (
        "get",
        "/vms/{id}/serial/stream",
        "WebSocket: serial output as text frames from now on",
        "viewer",
        None,
        101,
        None,
    ),
    (
        "post",
        "/vms/{id}/serial/input",
        "Type text into the running VM's serial port",
        "operator",
        Some("SerialInput"),
        204,
        None,
    ),
    (
        "get",
        "/vms/{id}/screenshot",
        "PNG of the running VM's screen, at most ?width (320) pixels wide",
        "viewer",
        None,
        200,
        None,
    ),
    (
        "get",
        "/vms/{id}/stats",
        "Samples newer than ?since (ms); ?resolution=s (1 h) or min (1 day)",
        "viewer",
        None,
        200,
        Some("Stats"),
    ),
    ("get", "/console", "WebSocket (?ticket=): binary frames carry the VM's RFB stream", "ticket", None, 101, None),
    ("get", "/images", "The image library", "viewer", None, 200, Some("ImageList")),
    (
        "put",
        "/images/{name}",
        "Upload (streamed; Content-Length and X-Porthole-Sha256 required)",
        "admin",
        None,
        201,
        Some("Image"),
    ),
    (
        "delete",
        "/images/{name}",
        "Delete an image no VM uses (409 names the VMs that use it)",
        "admin",
        None,
        204,
        None,
    ),
    (
        "post",
        "/osinfo/identify",
        "The OS the host's osinfo-db finds for an ISO's facts (an ISO not uploaded yet)",
        "viewer",
        Some("IsoFacts"),
        200,
        Some("Identified"),
    ),
    ("get", "/tasks", "Long operations (uploads, shutdowns) and their progress", "viewer", None, 200, Some("TaskList")),
    ("get", "/tasks/{id}", "One task", "viewer", None, 200, Some("Task")),
    (
        "post",
        "/tasks/{id}/cancel",
        "Cancel a running upload or a shutdown's wait (409 for others); the task ends cancelled",
        "operator",
        None,
        200,
        Some("Task"),
    ),
];

fn schema<T: schemars::JsonSchema>() -> Value {
    let mut v = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null);
    // Nested definitions move to components; references are rewritten to point there.
    if let Some(obj) = v.as_object_mut() {
        obj.remove("$schema");
        obj.remove("$defs");
    }
    rewrite_refs(&mut v);
    v
}

fn defs<T: schemars::JsonSchema>() -> Vec<(String, Value)> {
    let v = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null);
    v.get("$defs")
        .and_then(|d| d.as_object())
        .map(|d| {
            d.iter()
                .map(|(k, v)| {
                    let mut v = v.clone();
                    rewrite_refs(&mut v);
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn rewrite_refs(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("$ref")
                && let Some(name) = r.strip_prefix("#/$defs/")
            {
                *r = format!("#/components/schemas/{name}");
            }
            for child in map.values_mut() {
                rewrite_refs(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

/// The document.
pub fn document() -> Value {
    use porthole_api::*;
    let mut schemas = serde_json::Map::new();
    macro_rules! add {
        ($($t:ty),*) => {$(
            schemas.insert(stringify!($t).to_owned(), schema::<$t>());
            for (k, v) in defs::<$t>() {
                schemas.entry(k).or_insert(v);
            }
        )*};
    }
    add!(
        HostInfo,
        Vm,
        CreateVm,
        UpdateVm,
        MediaChange,
        AddDisk,
        GrowDisk,
        DiskLimits,
        NicLimits,
        KeyboardLeds,
        AddCdrom,
        NicDefinition,
        NicSpec,
        NicStatus,
        LinkChange,
        ConsoleTicket,
        SerialInput,
        SerialOutput,
        Stats,
        Image,
        Task,
        ErrorBody,
        FieldError,
        BootDevice,
        DisplaySpec,
        DriveInfo,
        SnapshotTree,
        TakeSnapshot,
        RevertSnapshot,
        CloneVm,
        IsoFacts,
        Identified
    );
    let list = |item: &str| json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}});
    schemas.insert("VmList".into(), list("Vm"));
    schemas.insert("ImageList".into(), list("Image"));
    schemas.insert("TaskList".into(), list("Task"));

    let mut paths = serde_json::Map::new();
    for (method, path, summary, role, request, status, response) in ROUTES {
        let mut op = json!({
            "summary": summary,
            "x-porthole-role": role,
            "responses": {
                "default": {
                    "description": "An error: 400 bad input (`invalid`: `fields` says why for each refused field), 401 no or bad token, 403 role or VM not allowed, 404, 409 state conflict, 413 too large, 422 an unusable image",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
                }
            }
        });
        let ok = match response {
            Some(s) => {
                json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{s}")}}}})
            }
            None => json!({"description": if *status == 101 { "Switching protocols (WebSocket)" } else { "OK" }}),
        };
        op["responses"][status.to_string()] = ok;
        if let Some(r) = request {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{r}")}}}});
        }
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if *role == "none" || *role == "ticket" {
            op["security"] = json!([]);
        }
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Porthole host API",
            "version": porthole_api::VERSION,
            "description": "portholed: the VMs of one host. Local: HTTP on a Unix socket (owner only). Remote: HTTPS with Authorization: Bearer TOKEN; roles viewer < operator < admin, optionally limited to some VMs."
        },
        "servers": [{"url": porthole_api::API_PREFIX}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{"bearer": []}],
        "paths": paths
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_schema_is_in_the_document() {
        let doc = document();
        for (method, path, ..) in ROUTES {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        for name in [
            "Vm",
            "CreateVm",
            "VmState",
            "BootSpec",
            "ExitInfo",
            "CrashReport",
            "ErrorBody",
            "Task",
            "TaskState",
            "NicDefinition",
            "NicSpec",
            "NicBackend",
            "NicStatus",
            "PortForward",
            "Protocol",
            "LinkChange",
            "SnapshotTree",
            "Snapshot",
            "TakeSnapshot",
            "RevertSnapshot",
            "CloneVm",
            "DiskFormat",
            "CloudInitSpec",
            "FieldError",
            "BootDevice",
            "DisplaySpec",
            "DriveInfo",
            "DriveKind",
            "AddDisk",
            "GrowDisk",
            "DiskLimits",
            "NicLimits",
            "AddCdrom",
            "MemoryBalloon",
        ] {
            assert!(doc["components"]["schemas"][name].is_object(), "schema {name}");
        }
        let text = doc.to_string();
        assert!(!text.contains("#/$defs/"), "every reference points into components");
        // The smallest create body's required fields are exactly name, vcpus, memory_mib.
        let mut required: Vec<&str> = doc["components"]["schemas"]["CreateVm"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(required, ["memory_mib", "name", "vcpus"]);
    }
}
