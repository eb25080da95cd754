"""The wheels the GPU check carries to the device machine, and the checks that keep that set right.

    python launch/gpu_check/wheels.py check .whl   # here, after gather_wheels.sh: complete, one version each, fits
    python launch/gpu_check/wheels.py installed    # there, after the install: every carried package's needs are met

wheels.txt pins what the run needs and the machine lacks; device_packages.txt lists what the machine has
(from /work/.library/device/KINDS.md). A carried wheel must never be one of the machine's own packages:
on PYTHONPATH it would shadow the machine's build (a second torch or transformers, say).
"""

from __future__ import annotations

import email.parser
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent

# The machine: CPython 3.12 on x86-64 Linux; the manylinux tags the device README's `pip download` asks for.
MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
SUPPORTED_TAGS = {*cpython_tags((3, 12), ["cp312", "abi3", "none"], PLATFORMS),
                  *compatible_tags((3, 12), "cp312", PLATFORMS)}


def read_list(path: Path) -> dict[str, str | None]:
    """`name` or `name==version` per line (comments and blank lines skipped), by canonical name."""
    entries: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            entries[canonicalize_name(name)] = version or None
    return entries


def pins() -> dict[str, str]:
    return read_list(HERE / "wheels.txt")  # type: ignore[return-value]  (every line is pinned)


def device_packages() -> dict[str, str | None]:
    return read_list(HERE / "device_packages.txt")


def needs(requires: list[str] | None) -> list[Requirement]:
    """The requirements that apply on the machine: markers evaluated there, extras' ones left out."""
    found = [Requirement(line) for line in requires or []]
    return [req for req in found if req.marker is None or req.marker.evaluate(MARKERS)]


def unmet(requirements: dict[str, list[Requirement]], available: dict[str, str | None]) -> list[str]:
    """Requirements whose package is not available, or available at a version known not to fit."""
    problems = []
    for owner, reqs in requirements.items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name not in available:
                problems.append(f"{owner} needs `{req}`: neither carried (wheels.txt) nor on the machine; add it")
            elif available[name] and not req.specifier.contains(available[name], prereleases=True):
                problems.append(f"{owner} needs `{req}` but {name} {available[name]} is what it would get")
    return problems


def wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(member).decode()).get_all("Requires-Dist") or []


def check_wheel_dir(folder: str | Path) -> list[str]:
    """Here: exactly the pinned wheels, one version each, installable on the machine, shadowing nothing
    of it, and every Requires-Dist met by the set itself or by the machine."""
    wanted, machine = pins(), device_packages()
    problems, found = [], {}
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in found:
            problems.append(f"two wheels of {name}: {found[name][1].name} and {wheel.name}; keep one")
        found[name] = (str(version), wheel)
        if not tags & SUPPORTED_TAGS:
            problems.append(f"{wheel.name} does not install on CPython 3.12, x86-64 Linux")
        if name in machine:
            problems.append(f"{wheel.name} would shadow the machine's own {name}; remove it")
        if name not in wanted:
            problems.append(f"{wheel.name} is not in wheels.txt; remove it or add it there")
        elif wanted[name] != str(version):
            problems.append(f"{wheel.name}: wheels.txt pins {name}=={wanted[name]}")
    problems += [f"no wheel for {name}=={version}; run gather_wheels.sh" for name, version in wanted.items()
                 if name not in found]
    requirements = {name: needs(wheel_requires(wheel)) for name, (_, wheel) in found.items()}
    return problems + unmet(requirements, {**machine, **{name: v for name, (v, _) in found.items()}})


def check_installed() -> list[str]:
    """There, after the install: each carried package is importable at its pin, and what it requires
    is installed at a version that fits (the machine's versions are mostly unknown until now)."""
    problems, requirements = [], {}
    for name, version in pins().items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed; did the wheels install into a folder on PYTHONPATH?")
            continue
        if got != version:
            problems.append(f"{name} {got} is installed, not the pinned {version}")
        requirements[name] = needs(metadata.requires(name))
    available = {}
    for req in (req for reqs in requirements.values() for req in reqs):
        try:
            available[canonicalize_name(req.name)] = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            pass
    return problems + unmet(requirements, available)


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and len(argv) == 2:
        problems, what = check_wheel_dir(argv[1]), f"{argv[1]} holds the {len(pins())} pinned wheels"
    elif argv == ["installed"]:
        problems, what = check_installed(), "every carried package and its requirements are installed"
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"wheels: {problem}", file=sys.stderr)
    if not problems:
        print(f"wheels: ok, {what}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
