"""The one error type a user sees as a single line: what was wrong and what is allowed."""


class UserError(Exception):
    """Bad input (config, data, model or network). The CLI prints it as one line and exits non-zero."""


def one_line(exc: BaseException) -> str:
    """A library's multi-line message (and its cause's) as one line: sentences joined by '; ', listed options by ', '."""
    lines: list[tuple[str, bool]] = []
    for error in (exc, exc.__cause__):
        for raw in str(error or "").splitlines():
            line = raw.strip()
            if line.startswith("Config search path"):  # Hydra's where-it-looked, noise to a user
                break
            if line and line not in (text for text, _ in lines):
                lines.append((line, raw.startswith((" ", "\t"))))
    out = ""
    for i, (line, listed) in enumerate(lines):
        if i:
            out += ", " if listed and lines[i - 1][1] else " " if lines[i - 1][0].endswith(":") else "; "
        out += line
    return out
