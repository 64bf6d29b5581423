"""Per-request costs from a callgrind profile taken with --dump-instr=yes (see profile.sh).

Usage: callgrind_costs.py CALLGRIND_OUT BINARY REQUESTS
Reads the profile once: each function's own and inclusive instructions, the calls made to
clock_gettime, and, from BINARY's disassembly, which executed instructions were atomic
read-modify-writes (lock-prefixed, or xchg with memory, which locks implicitly).
"""
import collections
import os
import re
import subprocess
import sys

NAMED = re.compile(r"\((\d+)\)(?:\s+(.*))?")


def atomic_addresses(binary):
    """Addresses of BINARY's atomic read-modify-write instructions."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary],
                             capture_output=True, text=True, check=True).stdout
    found = set()
    for line in listing.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S.*)", line)
        if m and (m.group(2).startswith("lock ") or re.match(r"xchg\s+.*\(", m.group(2))):
            found.add(int(m.group(1), 16))
    return found


def read_profile(path, binary, atomic):
    """(own instructions, inclusive instructions, atomic instructions, clock calls) by function."""
    names = {"fn": {}, "ob": {}}
    own = collections.Counter()
    inclusive = collections.Counter()
    atomics = collections.Counter()
    clock_calls = 0
    obj = fn = callee = None
    address = 0
    after_call = False
    binary_name = os.path.basename(binary)

    def name(kind, token):
        m = NAMED.match(token.strip())
        if not m:
            return token.strip()
        number, text = m.groups()
        if text:
            names[kind][number] = text
        return names[kind].get(number, number)

    for line in open(path, errors="replace"):
        key, _, rest = line.partition("=")
        if key in ("ob", "cob"):
            value = name("ob", rest)
            if key == "ob":
                obj = value
            continue
        if key in ("fn", "cfn"):
            value = name("fn", rest)
            if key == "fn":
                fn = value
            else:
                callee = value
            continue
        if key == "calls":
            after_call = True
            if callee and "clock_gettime" in callee:
                clock_calls += int(rest.split()[0])
            continue
        if not line[:1] or line[0] not in "0123456789+-*":
            continue
        parts = line.split()
        position = parts[0]
        if position.startswith("0x"):
            address = int(position, 16)
        elif position[0] in "+-":
            address += int(position)
        cost = int(parts[2]) if len(parts) > 2 else 0
        if after_call:  # the cost of the call just named, inclusive
            after_call = False
            inclusive[fn] += cost
            continue
        own[fn] += cost
        inclusive[fn] += cost
        if obj and os.path.basename(obj) == binary_name and address in atomic:
            atomics[fn] += cost
    return own, inclusive, atomics, clock_calls


def main():
    path, binary, requests = sys.argv[1], sys.argv[2], float(sys.argv[3])
    top = int(os.environ.get("TOP", "25"))
    own, inclusive, atomics, clock_calls = read_profile(path, binary, atomic_addresses(binary))
    per = lambda n: n / requests
    print(f"requests profiled:                 {requests:,.0f}")
    print(f"instructions per request:          {per(sum(own.values())):,.0f}")
    print(f"atomic instructions per request:   {per(sum(atomics.values())):.1f}")
    print(f"clock readings per request:        {per(clock_calls):.1f}")
    print(f"\nmost instructions per request, inclusive (own):")
    for fn, n in inclusive.most_common(top):
        print(f"{per(n):9,.0f} ({per(own[fn]):7,.0f})  {fn[:140]}")
    print(f"\nmost atomic instructions per request:")
    for fn, n in atomics.most_common(top):
        print(f"{per(n):9.1f}  {fn[:140]}")


if __name__ == "__main__":
    main()
