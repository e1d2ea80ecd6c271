#!/usr/bin/env python3
"""Writes tests/data/malformed/: safetensors files that each break one rule of the format, and
expected.json mapping each file to the error code refit must give and a phrase its message contains.
The files are checked in; rerun this only to change the corpus."""
import json
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "malformed")


def raw(header: bytes, data: bytes = b"", n=None) -> bytes:
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def hdr(obj) -> bytes:
    text = json.dumps(obj, separators=(",", ":")).encode()
    return text + b" " * ((8 - len(text) % 8) % 8)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CASES = {
    # name: (bytes, error code, phrase in the message)
    "too_small": (b"\x05\x00\x00", "file_too_small", "fewer than the 8-byte header length"),
    "header_too_large": (raw(b"{}", n=200_000_000), "header_too_large", "header length field is implausible"),
    "header_past_eof": (raw(b'{"a":1}', n=4096), "header_out_of_file", "runs past the end of the file"),
    "header_not_utf8": (raw(b'{"w\xff":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', b"\0" * 4), "header_not_utf8", "not valid UTF-8"),
    "header_bad_start": (raw(b'["not an object"]      '), "header_bad_start", "does not start with '{'"),
    "header_bad_json": (raw(b'{"w":{"dtype":"F32","shape":[1],'), "header_bad_json", "not valid JSON"),
    "duplicate_name": (raw(b'{"w":' + json.dumps(entry("U8", [1], 0, 1)).encode() + b',"w":' + json.dumps(entry("U8", [1], 1, 2)).encode() + b"}", b"\0\0"), "duplicate_tensor", "appears twice"),
    "entry_not_object": (raw(hdr({"w": [1, 2]})), "entry_not_object", "entry must be an object"),
    "unknown_dtype": (raw(hdr({"w": entry("F128", [1], 0, 16)}), b"\0" * 16), "unknown_dtype", "unknown dtype 'F128'"),
    "negative_dim": (raw(hdr({"w": entry("F32", [-1], 0, 4)}), b"\0" * 4), "bad_shape", "not a non-negative integer"),
    "shape_overflow": (raw(hdr({"w": entry("F64", [2**62, 2**62], 0, 8)}), b"\0" * 8), "bad_shape", "overflows the byte length"),
    "offsets_reversed": (raw(hdr({"w": entry("U8", [4], 4, 0)}), b"\0" * 4), "bad_offsets", "end before begin"),
    "offsets_not_pair": (raw(hdr({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0]}}), b"\0" * 4), "bad_offsets", "must be [begin, end]"),
    "length_mismatch": (raw(hdr({"w": entry("F32", [2], 0, 4)}), b"\0" * 4), "length_mismatch", "needs 8"),
    "packed_partial_byte": (raw(hdr({"w": entry("F4", [3], 0, 2)}), b"\0" * 2), "length_mismatch", "does not fill whole bytes"),
    "offsets_past_data": (raw(hdr({"w": entry("F32", [2], 0, 8)}), b"\0" * 6), "offsets_out_of_data", "lies past the data area"),
    "tiling_gap": (raw(hdr({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}), b"\0" * 12), "tiling_gap", "leaving a gap of 4 bytes"),
    "tiling_overlap": (raw(hdr({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}), b"\0" * 12), "tiling_overlap", "overlap tensor 'a'"),
    "trailing_bytes": (raw(hdr({"a": entry("F32", [1], 0, 4)}), b"\0" * 8), "trailing_bytes", "trailing bytes"),
    "metadata_not_strings": (raw(hdr({"__metadata__": {"format": 1}, "a": entry("U8", [1], 0, 1)}), b"\0"), "bad_metadata", "must be a string"),
    "unknown_entry_field": (raw(hdr({"a": {**entry("U8", [1], 0, 1), "quant": "nf4"}}), b"\0"), "unknown_entry_field", "unknown field 'quant'"),
    # A valid two-tensor file truncated by 2 bytes, as a partially copied checkpoint would be.
    "truncated_by_2": (raw(hdr({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 8, 16)}), b"\1" * 14), "offsets_out_of_data", "lies past the data area"),
}


def main():
    os.makedirs(HERE, exist_ok=True)
    expected = {}
    for name, (blob, code, phrase) in CASES.items():
        fname = name + ".safetensors"
        with open(os.path.join(HERE, fname), "wb") as f:
            f.write(blob)
        expected[fname] = {"code": code, "message_contains": phrase}
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(CASES)} files to {HERE}")


if __name__ == "__main__":
    main()
