#!/usr/bin/env python3
"""Generates control/apiserver/src/protobuf_schema.json from the k8s-pb crate's sources.

kubectl's typed clients (`kubectl create namespace`, `create configmap`, ...) send request
bodies as Kubernetes protobuf. The API server decodes them into JSON with a table of each
message's fields (tag, JSON name, type). k8s-pb's prost structs carry the tags and types;
this script extracts them. JSON names are the camelCase of the Rust field names, with the
Kubernetes acronyms (clusterIP, podIPs, ...) restored.

Usage: scripts/gen-protobuf-schema.py [path to k8s-pb-X.Y.Z/src]
"""
import json
import os
import re
import sys
import glob

PACKAGES = [
    "api/core/v1", "api/apps/v1", "api/batch/v1", "api/discovery/v1",
    "api/coordination/v1", "api/autoscaling/v1", "api/policy/v1",
    "api/rbac/v1", "api/authentication/v1", "api/authorization/v1", "api/certificates/v1",
    "apimachinery/pkg/apis/meta/v1", "apimachinery/pkg/runtime",
    "apimachinery/pkg/util/intstr", "apimachinery/pkg/api/resource",
]

# Kubernetes JSON names whose acronyms camelCase would lower.
ACRONYMS = {
    "clusterIp": "clusterIP", "clusterIps": "clusterIPs", "externalIps": "externalIPs",
    "loadBalancerIp": "loadBalancerIP", "hostIp": "hostIP", "hostIps": "hostIPs",
    "podIp": "podIP", "podIps": "podIPs", "podCidr": "podCIDR", "podCidrs": "podCIDRs",
    "hostPid": "hostPID", "hostIpc": "hostIPC", "clientIp": "clientIP", "ip": "ip",
    "targetWwns": "targetWWNs", "wwids": "wwids", "iscsi": "iscsi", "fc": "fc",
    "readOnlyRootFilesystem": "readOnlyRootFilesystem", "uid": "uid", "url": "url",
    "caBundle": "caBundle", "nodeIp": "nodeIP", "externalId": "externalID",
    "providerId": "providerID", "machineId": "machineID", "systemUuid": "systemUUID",
    "bootId": "bootID", "containerId": "containerID", "imageId": "imageID",
    "allocatedResourcesStatus": "allocatedResourcesStatus", "storagePolicyId": "storagePolicyID",
    "volumeId": "volumeID", "diskUri": "diskURI", "secretRef": "secretRef", "pdId": "pdID",
    "datasetUuid": "datasetUUID", "targetPortal": "targetPortal", "iqn": "iqn",
    "chapAuthDiscovery": "chapAuthDiscovery", "chapAuthSession": "chapAuthSession",
    "seLinuxOptions": "seLinuxOptions", "appArmorProfile": "appArmorProfile",
    "nonResourceUrls": "nonResourceURLs", "nonResourceUrLs": "nonResourceURLs", "uId": "uid",
    "targetCpuUtilizationPercentage": "targetCPUUtilizationPercentage",
    "currentCpuUtilizationPercentage": "currentCPUUtilizationPercentage",
    "targetWwNs": "targetWWNs",
    "podCidRs": "podCIDRs",
    "scaleIo": "scaleIO",
    "setHostnameAsFqdn": "setHostnameAsFQDN",
    "resourceId": "resourceID",
    "downwardApi": "downwardAPI",
    "serverAddressByClientCidRs": "serverAddressByClientCIDRs",
    "clientCidr": "clientCIDR",
    "insecureSkipTlsVerifyBackend": "insecureSkipTLSVerifyBackend",
}


# Fields that Go embeds in their struct (`json:",inline"`): protobuf gives them a field of
# their own, JSON spreads their fields into the enclosing object.
INLINE = {
    ("api/core/v1/ConfigMapEnvSource", "localObjectReference"),
    ("api/core/v1/ConfigMapKeySelector", "localObjectReference"),
    ("api/core/v1/ConfigMapProjection", "localObjectReference"),
    ("api/core/v1/ConfigMapVolumeSource", "localObjectReference"),
    ("api/core/v1/SecretEnvSource", "localObjectReference"),
    ("api/core/v1/SecretKeySelector", "localObjectReference"),
    ("api/core/v1/SecretProjection", "localObjectReference"),
    ("api/core/v1/EphemeralContainer", "ephemeralContainerCommon"),
    ("api/core/v1/PersistentVolumeSpec", "persistentVolumeSource"),
    ("api/core/v1/Probe", "handler"),
    ("api/core/v1/Volume", "volumeSource"),
    ("apimachinery/pkg/runtime/Unknown", "typeMeta"),
}


def camel(snake):
    parts = snake.split("_")
    name = parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    if name.startswith("r#"):
        name = name[2:]
    return ACRONYMS.get(name, name)


def resolve(module, type_expr):
    """Resolves a Rust type path, relative to `module`, into 'module/Name'."""
    type_expr = type_expr.strip()
    parts = type_expr.split("::")
    mod = module.split("/")
    while parts and parts[0] == "super":
        mod = mod[:-1]
        parts = parts[1:]
    name = parts[-1]
    if len(parts) > 1:
        mod = mod + parts[:-1]
    return "/".join(mod) + "/" + name


def inner_type(decl):
    """The message type inside Option<...>, Vec<...> or BTreeMap<String, ...>."""
    decl = re.sub(r"\s+", "", decl)
    m = re.search(r"BTreeMap<::prost::alloc::string::String,(.+?),?>$", decl)
    if m:
        return m.group(1)
    m = re.match(r"(?:::core::option::Option|::prost::alloc::vec::Vec)<(.+)>$", decl)
    if m:
        return m.group(1)
    return decl


def parse_file(path, module, out):
    text = open(path).read()
    for m in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
        name, body = m.group(1), m.group(2) + "\n"
        fields = []
        for fm in re.finditer(r"#\[prost\(([^\]]*)\)\]\s*pub (r#)?(\w+):", body, re.S):
            attrs, fname = fm.group(1), fm.group(3)
            # The type runs to the first comma outside angle brackets.
            depth, end = 0, fm.end()
            while end < len(body):
                c = body[end]
                if c == "<":
                    depth += 1
                elif c == ">":
                    depth -= 1
                elif c == "," and depth == 0:
                    break
                end += 1
            decl = body[fm.end():end]
            tag = int(re.search(r'tag = "(\d+)"', attrs).group(1))
            kind = attrs.split(",")[0].strip()
            repeated = " repeated" in attrs or attrs.startswith("repeated")
            field = {"tag": tag, "json": camel(fname), "repeated": repeated}
            if kind.startswith("btree_map") or kind.startswith("map"):
                kv = re.search(r'map = "([^"]+)"', attrs).group(1).split(",")
                field["kind"] = "map"
                field["value"] = kv[1].strip()
                if field["value"] == "message":
                    field["message"] = resolve(module, inner_type(decl))
            elif kind.startswith("bytes"):
                field["kind"] = "bytes"
            elif kind == "message":
                field["kind"] = "message"
                field["message"] = resolve(module, inner_type(decl))
            else:
                field["kind"] = kind
            if (module + "/" + name, field["json"]) in INLINE:
                field["inline"] = True
            fields.append(field)
        out[module + "/" + name] = fields


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/k8s-pb-*/src")))[-1]
    out = {}
    for pkg in PACKAGES:
        path = os.path.join(src, pkg, "mod.rs")
        parse_file(path, pkg, out)
    dest = os.path.join(os.path.dirname(__file__), "..", "control", "apiserver", "src", "protobuf_schema.json")
    with open(dest, "w") as f:
        json.dump(out, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")
    print(f"wrote {len(out)} messages to {os.path.normpath(dest)}")


if __name__ == "__main__":
    main()
