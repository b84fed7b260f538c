"""The wire is a contract: `stagemesh.v1` as it is now stays compatible with its last release.

`tests/data/stagemesh_v1_descriptor.binpb` is a FileDescriptorSet of the last release's protos
(commit 35101d6). Built with:

    git show REV:protos/stagemesh/v1/X.proto > DIR/stagemesh/v1/X.proto   # for cache, stagemesh
    python -m grpc_tools.protoc -IDIR --descriptor_set_out=tests/data/stagemesh_v1_descriptor.binpb \
        DIR/stagemesh/v1/cache.proto DIR/stagemesh/v1/stagemesh.proto

(rebuild it from the new release's commit when one is cut). The rules are those of binary wire
compatibility (buf's WIRE category, plus reserved names): a field number keeps its type and
cardinality, and its name unless the field is marked deprecated (a rename that keeps the old
meaning for old clients); a field or enum value that goes away leaves its number and name
reserved; a reserved number is never used again; messages, enums, services and rpcs (with their
request and response types and streaming) stay. Adding is always fine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from stagemesh.finish import finish_text, set_finish
from stagemesh.v1 import cache_pb2, stagemesh_pb2

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "tests" / "data" / "stagemesh_v1_descriptor.binpb"
PROTOS = ["stagemesh/v1/cache.proto", "stagemesh/v1/stagemesh.proto"]


def _compile(proto_root: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "current.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"--descriptor_set_out={out}",
                    *(str(proto_root / p) for p in PROTOS)], check=True, capture_output=True, text=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _reserved(desc) -> tuple[set[int], set[str]]:
    numbers = {n for r in desc.reserved_range for n in range(r.start, r.end)}  # end is exclusive
    return numbers, set(desc.reserved_name)


def _type(field) -> str:
    return field.type_name or descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)


def _check_enum(name: str, old, new, problems: list[str]) -> None:
    numbers, names = _reserved(new)
    now = {v.number: v for v in new.value}
    for value in old.value:
        if value.number not in now:
            if value.number not in numbers or value.name not in names:
                problems.append(f"{name}.{value.name} = {value.number} removed without reserving its number and name")
        elif now[value.number].name != value.name:
            problems.append(f"{name}: value {value.number} renamed {value.name} -> {now[value.number].name}")
    old_numbers, _ = _reserved(old)
    problems += [f"{name}.{v.name} reuses reserved number {v.number}" for v in new.value if v.number in old_numbers]


def _check_message(name: str, old, new, problems: list[str]) -> None:
    numbers, names = _reserved(new)
    now = {f.number: f for f in new.field}
    for field in old.field:
        where = f"{name}.{field.name} ({field.number})"
        f = now.get(field.number)
        if f is None:
            if field.number not in numbers or field.name not in names:
                problems.append(f"{where} removed without reserving its number and name")
            continue
        if (f.type, f.type_name) != (field.type, field.type_name):
            problems.append(f"{where} changed type {_type(field)} -> {_type(f)}")
        if (f.label == f.LABEL_REPEATED) != (field.label == field.LABEL_REPEATED):
            problems.append(f"{where} changed between repeated and singular")
        if f.name != field.name and not f.options.deprecated:
            problems.append(f"{where} renamed to {f.name} without being marked deprecated")
    old_numbers, _ = _reserved(old)
    problems += [f"{name}.{f.name} reuses reserved number {f.number}" for f in new.field if f.number in old_numbers]
    _check_nested(name, old, new, problems)


def _check_nested(scope: str, old, new, problems: list[str]) -> None:
    """Messages and enums declared in `old` (a file or a message) against those of `new`."""
    inner = "message_type" if isinstance(old, descriptor_pb2.FileDescriptorProto) else "nested_type"
    messages, enums = {m.name: m for m in getattr(new, inner)}, {e.name: e for e in new.enum_type}
    for m in getattr(old, inner):
        if m.name not in messages:
            problems.append(f"message {scope}.{m.name} removed")
        else:
            _check_message(f"{scope}.{m.name}", m, messages[m.name], problems)
    for e in old.enum_type:
        if e.name not in enums:
            problems.append(f"enum {scope}.{e.name} removed")
        else:
            _check_enum(f"{scope}.{e.name}", e, enums[e.name], problems)


def _check_services(old_file, new_file, problems: list[str]) -> None:
    services = {s.name: s for s in new_file.service}
    for service in old_file.service:
        if service.name not in services:
            problems.append(f"service {service.name} removed")
            continue
        methods = {m.name: m for m in services[service.name].method}
        for m in service.method:
            n = methods.get(m.name)
            if n is None:
                problems.append(f"rpc {service.name}.{m.name} removed")
            elif (n.input_type, n.output_type, n.client_streaming, n.server_streaming) != (
                    m.input_type, m.output_type, m.client_streaming, m.server_streaming):
                problems.append(f"rpc {service.name}.{m.name} changed its request, response or streaming")


def breaking_changes(old: descriptor_pb2.FileDescriptorSet, new: descriptor_pb2.FileDescriptorSet) -> list[str]:
    problems: list[str] = []
    files = {f.name: f for f in new.file}
    for old_file in old.file:
        new_file = files.get(old_file.name)
        if new_file is None:
            problems.append(f"file {old_file.name} removed")
            continue
        if new_file.package != old_file.package:
            problems.append(f"{old_file.name}: package {old_file.package} -> {new_file.package}")
        _check_nested(old_file.package, old_file, new_file, problems)
        _check_services(old_file, new_file, problems)
    return problems


def test_protos_compatible_with_last_release(tmp_path):
    old = descriptor_pb2.FileDescriptorSet.FromString(SNAPSHOT.read_bytes())
    assert sorted(f.name for f in old.file) == PROTOS
    assert breaking_changes(old, _compile(ROOT / "protos", tmp_path)) == []


def test_generated_stubs_match_protos(tmp_path):
    """stagemesh/v1/*_pb2.py are what scripts/gen_protos.sh makes of protos/ now."""
    current = {f.name: f for f in _compile(ROOT / "protos", tmp_path).file}
    for proto in current.values():  # protoc's descriptor sets carry json_name; the stubs leave it out
        _clear_json_names(proto.message_type)
    for module in (cache_pb2, stagemesh_pb2):
        generated = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert generated == current[generated.name], f"{generated.name}: run scripts/gen_protos.sh"


def _clear_json_names(messages) -> None:
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _clear_json_names(m.nested_type)


def test_check_catches_breaks(tmp_path):
    """The rules bite: each edit below of the last release's own protos is reported."""
    old = descriptor_pb2.FileDescriptorSet.FromString(SNAPSHOT.read_bytes())
    broken = descriptor_pb2.FileDescriptorSet()
    broken.CopyFrom(old)
    (proto,) = [f for f in broken.file if f.name == "stagemesh/v1/stagemesh.proto"]
    messages = {m.name: m for m in proto.message_type}
    gen = messages["GenerateResponse"]
    [f for f in gen.field if f.name == "finish_reason"][0].type = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
    fwd = messages["ForwardRequest"]
    fwd.field.remove([f for f in fwd.field if f.name == "replica"][0])
    [f for f in messages["Usage"].field if f.number == 1][0].name = "prompt"
    proto.service[0].method[0].server_streaming = False
    assert sorted(breaking_changes(old, broken)) == [
        "rpc Generation.Generate changed its request, response or streaming",
        "stagemesh.v1.ForwardRequest.replica (9) removed without reserving its number and name",
        "stagemesh.v1.GenerateResponse.finish_reason (3) changed type TYPE_STRING -> TYPE_INT32",
        "stagemesh.v1.Usage.prompt_tokens (1) renamed to prompt without being marked deprecated",
    ]
    assert breaking_changes(old, old) == []


def test_finish_reason_strings_survive_the_enum():
    """Users see the same strings as before the enum (`generate --json`, the HTTP API); a client
    of an older gateway reads the text field, and an older client reads it from field 3."""
    for reason in ("stop", "length", "cancelled", "error", "error:kv_capacity", "error:not_ready"):
        msg = stagemesh_pb2.GenerateResponse()
        set_finish(msg, reason)
        received = stagemesh_pb2.GenerateResponse.FromString(msg.SerializeToString())
        assert finish_text(received) == received.finish_reason_text == reason
    assert received.finish_reason == stagemesh_pb2.FINISH_REASON_ERROR and received.error == "not_ready"
    assert finish_text(stagemesh_pb2.GenerateResponse(text="mid-stream")) == ""
    assert finish_text(stagemesh_pb2.GenerateResponse(finish_reason_text="length")) == "length"
