"""Config loading, validation, the permission rule, and the atomic writers for init/first run."""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanshare import config, keys
from lanshare.config import (
    Config,
    FolderConfig,
    LoggingConfig,
    NetworkConfig,
    NodeConfig,
    TransferConfig,
)
from lanshare.errors import ConfigError, KeyFormatError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
KEY = keys.format_key(bytes(range(32)))
OTHER_KEY = keys.format_key(bytes(range(1, 33)))


Writer = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """Write a config file (mode 0600 unless told) and return its path."""

    def _write(text: str, mode: int = 0o600, name: str = "config.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(mode)
        return path

    return _write


def _error(path: Path, overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    return str(info.value)


# --- the example file and the code cannot drift -----------------------------------------------


def _example_with_key(tmp_path: Path, uncomment: bool = False) -> Path:
    text = EXAMPLE.read_text()
    text = re.sub(r'^key = ".*"$', f'key = "{KEY}"', text, flags=re.MULTILINE)
    if uncomment:
        text = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    path = tmp_path / "example.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_example_yields_exactly_the_defaults(tmp_path: Path) -> None:
    loaded = config.load(_example_with_key(tmp_path))
    assert loaded.node == NodeConfig()
    assert loaded.network == NetworkConfig()
    assert loaded.transfer == TransferConfig()
    assert loaded.logging == LoggingConfig()
    assert loaded.folders == (FolderConfig(path=config.default_folder_path(), key=KEY),)


def test_example_with_every_commented_key_enabled_is_valid(tmp_path: Path) -> None:
    loaded = config.load(_example_with_key(tmp_path, uncomment=True))
    assert loaded.node.name == "my-laptop"
    assert loaded.node.state_dir == Path.home() / ".local/state/lanshare"


def _example_keys() -> list[tuple[str, str, int]]:
    """(table, key, line number) of every key in the example, commented out or not."""
    table = ""
    found = []
    for number, line in enumerate(EXAMPLE.read_text().splitlines()):
        header = re.fullmatch(r"\[\[?(\w+)\]\]?", line)
        if header:
            table = header.group(1)
            continue
        match = re.match(r"^(?:# )?(\w+) = ", line)
        if match:
            found.append((table, match.group(1), number))
    return found


def test_example_mentions_every_field_in_its_table() -> None:
    documented = {(table, key) for table, key, _ in _example_keys()}
    expected = {(table, f.name) for table, cls in config.SECTIONS.items() for f in fields(cls)}
    expected |= {("folder", f.name) for f in fields(FolderConfig)}
    assert documented == expected


def test_example_has_a_comment_above_every_key() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for table, key, number in _example_keys():
        above = lines[number - 1]
        assert above.startswith("#"), f"{table}.{key} has no comment above it"
        assert not re.match(r"^# \w+ = ", above), f"{table}.{key}: comment is another key"


# --- where the file comes from ------------------------------------------------------------------


def test_missing_default_file_gives_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANSHARE_CONFIG", str(tmp_path / "absent.toml"))
    loaded = config.load()
    assert loaded == Config()
    assert loaded.folders == ()
    assert loaded.source is None


def test_default_path_honours_lanshare_config_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LANSHARE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.default_config_path() == tmp_path / "xdg/lanshare/config.toml"
    monkeypatch.setenv("LANSHARE_CONFIG", str(tmp_path / "explicit.toml"))
    assert config.default_config_path() == tmp_path / "explicit.toml"


def test_default_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Writer
) -> None:
    path = write("[network]\nport = 5000\n")
    monkeypatch.setenv("LANSHARE_CONFIG", str(path))
    loaded = config.load()
    assert loaded.network.port == 5000
    assert loaded.source == path


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope.toml")


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    assert "not a regular file" in _error(tmp_path)


def test_non_utf8_file_is_an_error(write: Writer) -> None:
    path = write("")
    path.write_bytes(b"[node]\nname = '\xff'\n")
    assert "not valid UTF-8" in _error(path)


def test_oversized_file_is_refused(write: Writer) -> None:
    path = write("#" * (config.MAX_CONFIG_SIZE + 1))
    assert "larger than" in _error(path)


def test_toml_syntax_error_names_file_and_line(write: Writer) -> None:
    path = write("[network]\nport = 1\nbind = [\n")
    assert _error(path).startswith(f"{path}:3: invalid TOML")
    path = write("[network]\nport = 1\nbind = ]\n[node]\n")
    assert _error(path).startswith(f"{path}:3:8: invalid TOML: Invalid value")
    path = write("[network]\n[network]\n")
    assert _error(path).startswith(f"{path}:2:")


# --- unknown keys, wrong types, bad values: one error naming file:table.key --------------------


def test_unknown_key_names_file_table_and_key(write: Writer) -> None:
    path = write("[network]\nprot = 1\n")
    message = _error(path)
    assert message.startswith(f"{path}:network.prot: unknown key")
    assert 'did you mean "port"' in message


def test_unknown_table_is_named(write: Writer) -> None:
    path = write("[netwrk]\nport = 1\n")
    assert _error(path).startswith(f"{path}:netwrk: unknown table")


def test_section_that_is_not_a_table(write: Writer) -> None:
    path = write("network = 5\n")
    assert _error(path).startswith(f"{path}:network: expected a [network] table")


@pytest.mark.parametrize(
    ("table", "key", "toml_value", "expected"),
    [
        ("network", "port", '"47474"', "an integer"),
        ("network", "port", "true", "an integer"),
        ("network", "port", "1.5", "an integer"),
        ("network", "bind", '"0.0.0.0"', "an array of strings"),
        ("network", "static_peers", "[1, 2]", "an array of strings"),
        ("transfer", "idle_timeout", "true", "a number"),
        ("transfer", "idle_timeout", '"15"', "a number"),
        ("transfer", "initial_rtt", "nan", "a finite number"),
        ("logging", "level", "3", "a string"),
        ("node", "name", "[]", "a string"),
        ("node", "state_dir", "1", "a path"),
    ],
)
def test_wrong_type_names_key_and_expectation(
    write: Writer, table: str, key: str, toml_value: str, expected: str
) -> None:
    path = write(f"[{table}]\n{key} = {toml_value}\n")
    message = _error(path)
    assert message.startswith(f"{path}:{table}.{key}: expected {expected}")


@pytest.mark.parametrize(
    ("table", "key", "toml_value", "fragment"),
    [
        ("network", "port", "65536", "from 0 to 65535"),
        ("network", "port", "-1", "from 0 to 65535"),
        ("network", "max_datagram_size", "1199", "from 1200 to 65507"),
        ("network", "max_datagram_size", "65508", "from 1200 to 65507"),
        ("network", "max_send_rate", "-1", "at least 0"),
        ("network", "max_recv_rate", "-5", "at least 0"),
        ("network", "fast_path", '"yes"', "auto, on, off"),
        ("network", "ip_version", '"ipv6"', "v4, v6, both"),
        ("network", "ip_version", '"4"', "v4, v6, both"),
        ("network", "static_peers", '["[fe80::1]:5"]', '"[fe80::1%eth0]:5"'),
        ("network", "bind", "[]", "at least one address"),
        ("network", "bind", '["localhost"]', "IP addresses"),
        ("network", "interfaces", '[""]', "interface names"),
        ("network", "static_peers", '["host"]', "port is missing"),
        ("network", "static_peers", '["host:0"]', "1 to 65535"),
        ("network", "static_peers", '["host:http"]', "1 to 65535"),
        ("network", "static_peers", '["::1:47474"]', "in brackets"),
        ("network", "static_peers", '["[nothost]:5"]', "not an IPv6 address"),
        ("network", "static_peers", '["[::1]5"]', '"[IPv6]:port"'),
        ("network", "static_peers", '["bad_host!:5"]', "not a host name"),
        ("network", "static_peers", '[":5"]', "not a host name"),
        ("transfer", "keepalive_interval", "0", "greater than 0"),
        ("transfer", "request_timeout", "-1.0", "greater than 0"),
        ("transfer", "io_workers", "0", "from 1 to 256"),
        ("transfer", "max_in_flight_size", "0", "at least 1"),
        ("transfer", "socket_buffer_size", "0", "at least 1"),
        ("logging", "level", '"verbose"', "debug, info, warning, error"),
        ("node", "name", '""', "1 to 63 bytes"),
        ("node", "name", '"' + "x" * 64 + '"', "1 to 63 bytes"),
        ("node", "name", '"a\\u0001b"', "control characters"),
        ("node", "state_dir", '"relative/dir"', "an absolute path"),
        ("node", "control_socket", '"/' + "s" * 107 + '"', "at most 107 bytes"),
        ("node", "control_group", '"staff users"', "a group name"),
        ("node", "control_group", "5", "expected a string"),
    ],
)
def test_bad_value_names_key_and_what_is_expected(
    write: Writer, table: str, key: str, toml_value: str, fragment: str
) -> None:
    path = write(f"[{table}]\n{key} = {toml_value}\n")
    message = _error(path)
    assert message.startswith(f"{path}:{table}.{key}: ")
    assert fragment in message


@pytest.mark.parametrize(
    ("key", "toml_value", "expected"),
    [
        ("max_datagram_size", "1200", 1200),
        ("max_datagram_size", "65507", 65507),
        ("port", "0", 0),
        ("port", "65535", 65535),
        ("static_peers", '["peer.lan:1", "192.0.2.1:47474", "[fe80::1%eth0]:9"]', None),
        ("bind", '["::", "127.0.0.1"]', ("::", "127.0.0.1")),
        ("fast_path", '"OFF"', "off"),
    ],
)
def test_edge_values_are_accepted(
    write: Writer, key: str, toml_value: str, expected: object
) -> None:
    path = write(f"[network]\n{key} = {toml_value}\n")
    value = getattr(config.load(path).network, key)
    if expected is not None:
        assert value == expected


def test_values_are_converted(write: Writer) -> None:
    path = write(
        '[node]\nstate_dir = "~/state/../st"\n'
        "[transfer]\nidle_timeout = 20\n"
        '[logging]\nlevel = "DEBUG"\n'
    )
    loaded = config.load(path)
    assert loaded.node.state_dir == Path.home() / "st"
    assert loaded.transfer.idle_timeout == 20.0
    assert isinstance(loaded.transfer.idle_timeout, float)
    assert loaded.logging.level == "debug"


def test_keepalive_must_be_shorter_than_idle_timeout(write: Writer) -> None:
    path = write("[transfer]\nkeepalive_interval = 20.0\n")
    message = _error(path)
    assert message.startswith(f"{path}:transfer.keepalive_interval: ")
    assert "must be longer" in message
    path = write("[transfer]\nidle_timeout = 2.0\n")
    assert _error(path).startswith(f"{path}:transfer.idle_timeout: ")


def test_in_flight_credit_must_hold_a_datagram(write: Writer) -> None:
    path = write("[transfer]\nmax_in_flight_size = 1000\n")
    assert _error(path).startswith(f"{path}:transfer.max_in_flight_size: ")
    path = write("[network]\nmax_datagram_size = 9000\n[transfer]\nmax_in_flight_size = 8000\n")
    assert _error(path).startswith(f"{path}:transfer.max_in_flight_size: ")


# --- folders -----------------------------------------------------------------------------------


def _folder(path: str, key: str = KEY, extra: str = "") -> str:
    return f'[[folder]]\npath = "{path}"\nkey = "{key}"\n{extra}'


def test_folders_are_loaded_expanded_and_canonical(write: Writer, tmp_path: Path) -> None:
    lowered = KEY.lower().replace("-", " ")
    path = write(
        _folder("~/Shared", lowered, 'ignore = ["*.tmp", "build/"]\n')
        + _folder(str(tmp_path / "b" / ".." / "other"), OTHER_KEY)
    )
    loaded = config.load(path)
    assert loaded.folders == (
        FolderConfig(path=Path.home() / "Shared", key=KEY, ignore=("*.tmp", "build/")),
        FolderConfig(path=tmp_path / "other", key=OTHER_KEY),
    )


def test_mistyped_folder_key_is_caught_by_its_checksum(write: Writer) -> None:
    chars = list(KEY)
    chars[3] = "Z" if chars[3] != "Z" else "Y"
    path = write(_folder("/srv/share", "".join(chars)))
    with pytest.raises(KeyFormatError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}:folder[1].key: ")
    assert "check for a typo" in str(info.value)


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        (_folder("relative/dir"), "folder[1].path", "an absolute path"),
        ('[[folder]]\nkey = "' + KEY + '"\n', "folder[1].path", "missing"),
        ('[[folder]]\npath = "/srv/a"\n', "folder[1].key", "missing"),
        (_folder("/srv/a", extra="ignores = []\n"), "folder[1].ignores", "unknown key"),
        (_folder("/srv/a", extra='ignore = "*.tmp"\n'), "folder[1].ignore", "array of strings"),
        ('[[folder]]\npath = "/srv/a"\nkey = 5\n', "folder[1].key", "a key string"),
        (_folder("/srv/a") + _folder("/srv/a/", OTHER_KEY), "folder[2].path", "already shared"),
        (_folder("/srv/a") + _folder("/srv/a/sub", OTHER_KEY), "folder[2].path", "nested"),
        (_folder("/srv/a/sub") + _folder("/srv/a", OTHER_KEY), "folder[2].path", "nested"),
        (_folder("/srv/a") + _folder("/srv/b"), "folder[2].key", "same key"),
        (f'folder = {{ path = "/srv/a", key = "{KEY}" }}\n', "folder", "[[folder]] tables"),
    ],
)
def test_bad_folder_tables(write: Writer, text: str, where: str, fragment: str) -> None:
    path = write(text)
    message = _error(path)
    assert message.startswith(f"{path}:{where}")
    assert fragment in message


def test_sibling_folders_with_common_prefix_are_not_nested(write: Writer) -> None:
    path = write(_folder("/srv/a") + _folder("/srv/ab", OTHER_KEY))
    assert len(config.load(path).folders) == 2


# --- a file holding a key must be private ------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_config_with_key_readable_by_others_is_refused(write: Writer, mode: int) -> None:
    path = write(_folder("/srv/a"), mode=mode)
    message = _error(path)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message


def test_refusal_comes_first_even_when_the_key_is_mistyped(write: Writer) -> None:
    path = write(_folder("/srv/a", key="not-a-key") + "[network]\nport = -1\n", mode=0o644)
    assert "chmod 600" in _error(path)


def test_chmod_hint_quotes_awkward_paths(tmp_path: Path) -> None:
    path = tmp_path / "my config.toml"
    path.write_text(_folder("/srv/a"))
    path.chmod(0o644)
    assert f"chmod 600 '{path}'" in _error(path)


def test_private_config_with_key_loads(write: Writer) -> None:
    for mode in (0o600, 0o400):
        assert config.load(write(_folder("/srv/a"), mode=mode)).folders[0].key == KEY


def test_config_without_keys_may_be_world_readable(write: Writer) -> None:
    assert config.load(write("[network]\nport = 1\n", mode=0o644)).network.port == 1


# --- overrides (command-line flags) ------------------------------------------------------------


def test_overrides_win_over_file(write: Writer) -> None:
    path = write('[network]\nport = 5000\nbind = ["127.0.0.1"]\n[logging]\nlevel = "error"\n')
    loaded = config.load(path, {"network.port": 0, "logging.level": "debug"})
    assert loaded.network.port == 0
    assert loaded.network.bind == ("127.0.0.1",)
    assert loaded.logging.level == "debug"


def test_overrides_apply_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANSHARE_CONFIG", str(tmp_path / "absent.toml"))
    loaded = config.load(None, {"node.state_dir": tmp_path, "network.static_peers": ["a:1"]})
    assert loaded.node.state_dir == tmp_path
    assert loaded.network.static_peers == ("a:1",)


def test_none_override_means_not_given(write: Writer) -> None:
    path = write("[network]\nport = 5000\n")
    assert config.load(path, {"network.port": None}).network.port == 5000


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        ({"network.port": 70000}, "command line:network.port: expected an integer from 0"),
        ({"network.port": "1"}, "command line:network.port: expected an integer"),
        ({"network.prot": 1}, "command line:network.prot: unknown key"),
        ({"port": 1}, "command line:port: unknown setting"),
        ({"nowhere.port": 1}, "command line:nowhere.port: unknown setting"),
        ({"folder.path": "/x"}, "command line:folder.path: folders cannot be overridden"),
        ({"transfer.keepalive_interval": 30}, "command line:transfer.keepalive_interval: "),
    ],
)
def test_overrides_are_validated_like_file_values(
    write: Writer, overrides: dict[str, object], start: str
) -> None:
    assert _error(write("[network]\nport = 1\n"), overrides).startswith(start)


@given(st.integers(min_value=-(2**20), max_value=2**20))
def test_port_override_is_valid_exactly_in_range(port: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.toml"
        path.write_text("")
        if 0 <= port <= 65535:
            assert config.load(path, {"network.port": port}).network.port == port
        else:
            with pytest.raises(ConfigError, match=r"command line:network\.port"):
                config.load(path, {"network.port": port})


# --- add_folder: lanshare init -----------------------------------------------------------------


def test_add_folder_creates_private_file_with_parents(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "config.toml"
    added = config.add_folder(path, tmp_path / "share", KEY.lower())
    assert added == FolderConfig(path=tmp_path / "share", key=KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# ")
    assert text.count("\n#") == 0
    assert text.splitlines()[1] == "[[folder]]"
    assert config.load(path).folders == (added,)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]


def test_add_folder_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        config.add_folder(tmp_path / "c.toml", tmp_path / "share", KEY)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.toml").stat().st_mode) == 0o600


def test_add_folder_appends_and_keeps_everything(write: Writer, tmp_path: Path) -> None:
    original = (
        "# my notes about this machine\n"
        "[network]\n"
        "port = 5000  # fixed for the firewall\n"
        + _folder(str(tmp_path / "first"))
        + "# trailing comment without newline"
    )
    path = write(original)
    added = config.add_folder(path, tmp_path / "second", OTHER_KEY)
    text = path.read_text()
    assert text.startswith(original)
    loaded = config.load(path)
    assert loaded.network.port == 5000
    assert [f.path for f in loaded.folders] == [tmp_path / "first", tmp_path / "second"]
    assert loaded.folders[-1] == added
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_add_folder_drops_group_and_other_permissions(write: Writer, tmp_path: Path) -> None:
    path = write("[network]\nport = 5000\n", mode=0o644)
    config.add_folder(path, tmp_path / "share", KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load(path).network.port == 5000


def test_add_folder_keeps_owner_only_mode(write: Writer, tmp_path: Path) -> None:
    path = write("", mode=0o400)
    config.add_folder(path, tmp_path / "share", KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


@pytest.mark.parametrize(
    ("existing", "fragment"),
    [
        (lambda share: _folder(share), "already shared"),
        (lambda share: _folder(share + "/"), "already shared"),
        (lambda share: _folder("/elsewhere", KEY), "already used by the shared folder"),
    ],
)
def test_add_folder_refuses_duplicates_and_never_overwrites(
    write: Writer, tmp_path: Path, existing: Callable[[str], str], fragment: str
) -> None:
    share = str(tmp_path / "share")
    path = write(existing(share))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=fragment):
        config.add_folder(path, Path(share), KEY)
    assert path.read_bytes() == before


def test_add_folder_refuses_nested_and_invalid_files_untouched(
    write: Writer, tmp_path: Path
) -> None:
    path = write(_folder(str(tmp_path / "share")))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="nested"):
        config.add_folder(path, tmp_path / "share" / "inner", OTHER_KEY)
    assert path.read_bytes() == before
    broken = write("[network\n", name="broken.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.add_folder(broken, tmp_path / "x", KEY)
    assert broken.read_text() == "[network\n"


def test_add_folder_refuses_a_public_file_holding_keys(write: Writer, tmp_path: Path) -> None:
    path = write(_folder(str(tmp_path / "a")), mode=0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        config.add_folder(path, tmp_path / "b", OTHER_KEY)


def test_add_folder_rejects_bad_input_before_touching_anything(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    with pytest.raises(KeyFormatError):
        config.add_folder(path, tmp_path / "share", KEY[:-1] + ("0" if KEY[-1] != "0" else "1"))
    with pytest.raises(ConfigError, match="absolute path"):
        config.add_folder(path, Path("relative"), KEY)
    assert not path.exists()


def test_add_folder_follows_a_symlinked_config(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "lanshare.toml"
    real.parent.mkdir()
    real.write_text("[network]\nport = 5000\n")
    real.chmod(0o600)
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    config.add_folder(link, tmp_path / "share", KEY)
    assert link.is_symlink()
    assert config.load(link).folders[0].path == tmp_path / "share"


def test_add_folder_into_empty_existing_file(write: Writer, tmp_path: Path) -> None:
    path = write("")
    config.add_folder(path, tmp_path / "share", KEY)
    assert path.read_text().startswith("[[folder]]\n")


@settings(max_examples=60, deadline=None)
@given(
    st.text(
        st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"),
        min_size=1,
        max_size=40,
    ).filter(lambda name: name not in (".", ".."))
)
def test_any_folder_name_round_trips_through_the_file(name: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.toml"
        share = Path(directory) / name
        config.add_folder(path, share, KEY)
        config.add_folder(path, Path(directory) / "second", OTHER_KEY)
        assert [f.path for f in config.load(path).folders] == [share, Path(directory) / "second"]


def test_add_folder_rejects_undecodable_names(tmp_path: Path) -> None:
    share = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        config.add_folder(tmp_path / "c.toml", share, KEY)
    assert not (tmp_path / "c.toml").exists()


# --- ensure_config: the daemon's first run -----------------------------------------------------


def test_ensure_config_creates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "cfg" / "config.toml"
    first, created = config.ensure_config(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [f.path for f in first.folders] == [tmp_path / "home" / "LanShare"]
    keys.parse_key(first.folders[0].key)
    again, created_again = config.ensure_config(path, {"network.port": 0})
    assert not created_again
    assert again.folders == first.folders
    assert again.network.port == 0


def test_ensure_config_uses_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANSHARE_CONFIG", str(tmp_path / "c.toml"))
    _, created = config.ensure_config()
    assert created
    assert config.load().source == tmp_path / "c.toml"


def test_ensure_config_leaves_an_existing_file_alone(write: Writer) -> None:
    path = write("[network]\nport = 5000\n")
    loaded, created = config.ensure_config(path)
    assert not created
    assert loaded.folders == ()
    assert path.read_text() == "[network]\nport = 5000\n"


# --- parse_host_port ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("peer:47474", ("peer", 47474)),
        ("peer.lan.:1", ("peer.lan.", 1)),
        ("192.0.2.1:65535", ("192.0.2.1", 65535)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
        ("[fe80::1%eth0]:47474", ("fe80::1%eth0", 47474)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert config.parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["", "peer", "peer:", "peer:65536", "-peer:1", "a..b:1", "[::1]"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        config.parse_host_port(text)


def test_concurrent_add_folder_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    errors: list[BaseException] = []
    barrier = threading.Barrier(6, timeout=10)

    def add(number: int) -> None:
        try:
            barrier.wait()
            config.add_folder(
                path, tmp_path / f"share{number}", keys.format_key(bytes([number]) * 32)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    shared = {f.path for f in config.load(path).folders}
    assert shared == {tmp_path / f"share{n}" for n in range(6)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_concurrent_first_runs_create_one_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "cfg" / "config.toml"
    results: list[tuple[Config, bool]] = []
    barrier = threading.Barrier(6, timeout=10)

    def first_run() -> None:
        barrier.wait()
        results.append(config.ensure_config(path))

    threads = [threading.Thread(target=first_run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 6
    assert sum(created for _, created in results) == 1
    assert len({loaded.folders for loaded, _ in results}) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_add_folder_keeps_the_owner(write: Writer, tmp_path: Path) -> None:
    path = write("[network]\nport = 5000\n")
    os.chown(path, 4242, 4243)
    config.add_folder(path, tmp_path / "share", KEY)
    st_after = path.stat()
    assert (st_after.st_uid, st_after.st_gid) == (4242, 4243)


def test_config_directory_that_cannot_exist(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot use the config directory"):
        config.add_folder(tmp_path / "file" / "c.toml", tmp_path / "share", KEY)


def test_unreadable_config_path_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert "cannot read the config file" in _error(tmp_path / "file" / "c.toml")


def test_control_socket_defaults_to_the_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert NodeConfig().control_socket == tmp_path / "lanshare" / "control.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert NodeConfig().control_socket == tmp_path / "state" / "lanshare" / "control.sock"


def test_interface_names_are_accepted(write: Writer) -> None:
    path = write('[network]\ninterfaces = ["eth0", "192.0.2.1"]\n')
    assert config.load(path).network.interfaces == ("eth0", "192.0.2.1")


def test_dates_are_named_in_type_errors(write: Writer) -> None:
    path = write("[network]\nport = 1979-05-27\n")
    assert _error(path).endswith("expected an integer, got a date")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_delete_ratio", 1.5, "between 0 and 1"),
        ("max_delete_ratio", 0, "between 0 and 1"),
        ("max_delete_min", -1, "at least 0"),
        ("delete_window", 0, "seconds greater than 0"),
        ("delete_window", -60, "seconds greater than 0"),
        ("versions_keep_days", 0, "days greater than 0"),
        ("debounce_interval", -0.1, "seconds greater than 0"),
        ("max_vector_devices", 0, "from 1 to 1024 devices"),
        ("max_vector_devices", 1025, "from 1 to 1024 devices"),
        ("max_peer_records", 99, "from 100 to 1000000000 records"),
        ("max_peer_records", 1_000_000_001, "from 100 to 1000000000 records"),
    ],
)
def test_sync_section_is_checked(tmp_path: Path, key: str, value: float, expected: str) -> None:
    file = tmp_path / "config.toml"
    file.write_text(f"[sync]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"config.toml:sync.{key}: .*{expected}"):
        config.load(file)


def test_the_record_limit_per_peer_defaults_to_two_million(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text("[sync]\n")
    assert config.load(file).sync.max_peer_records == 2_000_000
    file.write_text("[sync]\nmax_peer_records = 5000\n")
    assert config.load(file).sync.max_peer_records == 5000


# --- the system service's config and where the command line looks for a daemon ------------------


def test_a_config_created_for_the_system_service_names_its_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "lanshare" / "config.toml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    # Whoever creates or reads it (the service user, root), whatever their environment.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "somebody"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "somebody-run"))
    config.add_folder(system, tmp_path / "Shared", KEY)
    loaded = config.load(system)
    assert loaded.node.state_dir == config.SYSTEM_STATE_DIR == Path("/var/lib/lanshare")
    assert loaded.node.control_socket == Path("/run/lanshare/control.sock")
    assert loaded.node.control_group == "lanshare"
    assert stat.S_IMODE(system.stat().st_mode) == 0o600
    # The daemon's first run creates the same file.
    first_run = tmp_path / "first-run" / "config.toml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", first_run)
    monkeypatch.setenv("HOME", str(tmp_path))
    created, made = config.ensure_config(first_run)
    assert made
    assert created.node == loaded.node


def test_a_system_config_from_before_the_node_table_still_names_the_service_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config the previous release wrote for the service has no [node] table: read as
    the system config, it still leads to the service's index, socket and group."""
    system = tmp_path / "etc" / "lanshare" / "config.toml"
    system.parent.mkdir(parents=True)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "root-state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "root-run"))
    fd = os.open(system, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'[[folder]]\npath = "{tmp_path / "Shared"}"\nkey = "{KEY}"\n')
    loaded = config.load(system)
    assert loaded.node.state_dir == Path("/var/lib/lanshare")
    assert loaded.node.control_socket == Path("/run/lanshare/control.sock")
    assert loaded.node.control_group == "lanshare"
    # What the file says still wins, and so does the command line.
    with system.open("a") as f:
        f.write('[node]\ncontrol_socket = "/run/elsewhere.sock"\n')
    assert config.load(system).node.control_socket == Path("/run/elsewhere.sock")
    other = config.load(system, {"node.control_group": "staff"})
    assert other.node.control_group == "staff"


def test_any_other_new_config_keeps_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    path = tmp_path / "config.toml"
    config.add_folder(path, tmp_path / "Shared", KEY)
    assert "[node]" not in path.read_text()
    node = config.load(path).node
    assert node.state_dir == tmp_path / "state" / "lanshare"
    assert node.control_socket == tmp_path / "run" / "lanshare" / "control.sock"
    assert node.control_group == ""


def test_users_without_a_config_try_their_socket_then_the_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert config.user_control_sockets() == (
        tmp_path / "run" / "lanshare" / "control.sock",
        Path("/run/lanshare/control.sock"),
    )
    # The service's own user (the unit sets XDG_RUNTIME_DIR=/run) has one place to look.
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run")
    assert config.user_control_sockets() == (Path("/run/lanshare/control.sock"),)


def test_the_delete_window_defaults_to_an_hour_and_takes_seconds(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text("[sync]\n")
    assert config.load(file).sync.delete_window == 3600.0
    file.write_text("[sync]\ndelete_window = 90\n")
    assert config.load(file).sync.delete_window == 90.0


# --- ip_version ---------------------------------------------------------------------------------


def test_ip_version_defaults_to_both_and_bind_follows_it(write: Writer) -> None:
    loaded = config.load(write('[network]\nip_version = "V6"\n'))
    assert (loaded.network.ip_version, loaded.network.bind) == ("v6", ())
    assert config.NetworkConfig().ip_version == "both"


@pytest.mark.parametrize(
    ("ip_version", "bind"), [("v6", '["0.0.0.0"]'), ("v6", '["10.0.0.1"]'), ("v4", '["::1"]')]
)
def test_ip_version_and_a_bind_of_the_other_family_contradict(
    write: Writer, ip_version: str, bind: str
) -> None:
    path = write(f'[network]\nip_version = "{ip_version}"\nbind = {bind}\n')
    message = _error(path)
    assert message.startswith(f"{path}:network.")
    assert f'ip_version = "{ip_version}" needs an IPv' in message
    assert "(or leave bind out)" in message


@pytest.mark.parametrize(("ip_version", "bind"), [("v4", '["::"]'), ("v6", '["::"]')])
def test_ip_version_with_a_dual_stack_bind_is_fine(
    write: Writer, ip_version: str, bind: str
) -> None:
    assert config.load(write(f'[network]\nip_version = "{ip_version}"\nbind = {bind}\n'))
