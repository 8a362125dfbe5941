"""Writes the text symbols of BINARY that CALLGRIND_OUT saw run, most
instructions first, one per line: a --symbol-ordering-file for lld.

Usage: link-order.py CALLGRIND_OUT BINARY ORDER_FILE
"""
import re
import subprocess
import sys


def executed(path):
    """Instructions per function (mangled name) in a callgrind output."""
    cost, names, current = {}, {}, None
    with open(path, errors="replace") as lines:
        for line in lines:
            if line.startswith(("fn=", "cfn=")):
                value = line.split("=", 1)[1].strip()
                compressed = re.match(r"\((\d+)\)(?: (.*))?", value)
                if compressed:
                    if compressed.group(2):
                        names[compressed.group(1)] = compressed.group(2)
                    name = names.get(compressed.group(1))
                else:
                    name = value
                if line.startswith("fn="):
                    current = name
                    cost.setdefault(current, 0)
            elif current and re.match(r"^[+\-*]?\d+ \d+", line):
                cost[current] += int(line.split()[1])
    return cost


def text_symbols(binary):
    listing = subprocess.run(
        ["nm", "--defined-only", binary], capture_output=True, text=True, check=True
    ).stdout
    return {
        fields[2]
        for fields in (line.split() for line in listing.splitlines())
        if len(fields) == 3 and fields[1] in "tTwW"
    }


def main():
    callgrind_out, binary, order_file = sys.argv[1:4]
    cost = executed(callgrind_out)
    text = text_symbols(binary)
    chosen = sorted((n for n in cost if n in text), key=lambda n: -cost[n])
    with open(order_file, "w") as out:
        out.write("".join(name + "\n" for name in chosen))
    print(f"{order_file}: {len(chosen)} functions ({len(cost)} seen by callgrind)")


if __name__ == "__main__":
    main()
