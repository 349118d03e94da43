"""Notebook 09 (serving): what it writes out by hand, what it checks, and what its text says
about the server and its command line agree with the helpers.

nbval runs the notebook and compares its checked cells; these tests read the notebook itself:
the examples a learner copies (the Claude Desktop configuration, the SDK client) must start a
server that can read images, the text must name real options, and the checked cells must show
only what does not depend on the model's weights.
"""

import ast
import dataclasses
import json
import re
from pathlib import Path

import nbformat
import pytest

from florence_helpers.cli.serving import _parser
from florence_helpers.serve.settings import API_KEY_ENV_VAR, ServeSettings

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "09_serving.ipynb"
CHECK_TAG = "nbval-check-output"


@pytest.fixture(scope="module")
def cells() -> list:
    return nbformat.read(NOTEBOOK, as_version=4).cells


def _main_text(cells: list) -> list:
    """The cells before the exercises."""
    (end,) = [i for i, c in enumerate(cells) if c.source.startswith("## Exercises")]
    return cells[:end]


def _one_code_cell(cells: list, marker: str):
    (cell,) = [c for c in cells if c.cell_type == "code" and marker in c.source]
    return cell


def _fenced(cells: list, language: str, marker: str) -> str:
    """The one fenced block of ``language`` in the markdown that contains ``marker``."""
    blocks = [
        block
        for cell in cells
        if cell.cell_type == "markdown"
        for block in re.findall(rf"```{language}\n(.*?)```", cell.source, re.S)
        if marker in block
    ]
    (block,) = blocks
    return block


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_no_cell_speaks_of_the_tests(cells):
    for cell in cells:
        assert "the tests" not in cell.source.lower(), cell.source[:80]


def test_the_claude_desktop_example_allows_a_folder_the_command_line_accepts(cells):
    config = json.loads(_fenced(cells, "json", "mcpServers"))
    (server,) = config["mcpServers"].values()
    assert server["args"][:3] == ["-m", "florence_helpers", "mcp"]
    options = _parser(mcp=True).parse_args(server["args"][3:])
    assert options.allow_folder and Path(options.allow_folder[0]).is_absolute()
    assert "FLORENCE_MODEL" in server["env"]


def test_the_sdk_client_example_allows_the_notebook_s_images(cells):
    code = _fenced(cells, "python", "StdioServerParameters")
    (call,) = [
        node
        for node in ast.walk(ast.parse(code))  # top-level await: as in a notebook
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "StdioServerParameters"
    ]
    (args,) = [ast.literal_eval(k.value) for k in call.keywords if k.arg == "args"]
    assert args[:3] == ["-m", "florence_helpers", "mcp"]
    options = _parser(mcp=True).parse_args(args[3:])
    assert options.allow_folder == ["../images"]
    assert '"image": "../images/cat.jpg"' in code  # an image under the allowed folder


def test_a_fastapi_endpoint_is_written_out_and_served(cells):
    endpoint = _one_code_cell(cells, "FastAPI()")
    for piece in ("UploadFile", "@app.post(", "load_image(", "run(florence", ".to_dict()"):
        assert piece in endpoint.source, piece
    assert len([line for line in endpoint.source.splitlines() if line.strip()]) <= 15
    served = _one_code_cell(cells, "uvicorn.Server(")
    assert "threading.Thread" in served.source


def test_an_mcp_tool_is_written_out_with_the_official_sdk(cells):
    tool = _one_code_cell(cells, "from mcp.server.mcpserver import MCPServer")
    assert "@my_tools.tool()" in tool.source
    assert "allowed_folders=" in tool.source  # a tool reads only the folder it is given


def test_the_written_out_code_is_compared_with_the_helpers_printing_only_a_boolean(cells):
    comparisons = [c for c in cells if c.cell_type == "code" and "same answer as" in c.source]
    assert len(comparisons) == 2
    for cell in comparisons:
        assert CHECK_TAG in cell.metadata.get("tags", [])
        (line,) = _stdout(cell).splitlines()
        assert line.startswith("same answer as ") and line.endswith(": True"), line


def test_checked_cells_show_nothing_the_model_wrote(cells):
    """The model here has random weights: what it writes must never be a checked output."""
    for cell in cells:
        if cell.cell_type != "code" or CHECK_TAG not in cell.metadata.get("tags", []):
            continue
        for shown in ('["text"]', ".text", "structured_content", "plot_result", "to_dict()"):
            assert shown not in cell.source, (shown, cell.source[:80])


def test_an_mcp_tool_is_called_in_the_main_text_on_an_allowed_folder(cells):
    main = _main_text(cells)
    setup = _one_code_cell(main, "mcp_server(florence")
    assert 'allowed_folders=("../images",)' in setup.source
    call = _one_code_cell(main, 'await tools.call_tool("caption"')
    assert "../images/cat.jpg" in call.source
    assert CHECK_TAG not in call.metadata.get("tags", [])  # the model's caption: not checked


def test_the_security_part_links_the_readme_and_shows_the_refusals(cells):
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    assert "(../README.md#security)" in text
    assert re.search(r"^### Security$", (REPO / "README.md").read_text(), re.M)
    for point in ("169.254.169.254", "0.0.0.0", "TLS", "reverse proxy", "Authorization: Bearer"):
        assert point in text, point
    refused = _one_code_cell(cells, "http://169.254.169.254/")
    assert _stdout(refused) == "400 url\n400 url\n"
    keyed = _one_code_cell(cells, "ServeSettings(api_key=")
    without, with_key = _stdout(keyed).splitlines()
    assert " 401 ['status', 'waiting']" in without
    assert " 200 ['device', 'dtype', 'model', 'status', 'waiting']" in with_key


def test_the_options_and_settings_the_text_names_exist(cells):
    text = "\n".join(c.source for c in cells)
    prose = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", prose))
    assert {"--allow-folder", "--allow-host", "--api-key", "--server-name"} <= options
    known = set()
    for mcp in (False, True):
        for action in _parser(mcp=mcp)._actions:
            known.update(action.option_strings)
    assert options <= known, options - known
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    named = set(re.findall(r"ServeSettings\((\w+)=", text))
    assert {"api_key", "allowed_folders", "fetch_hosts", "server_names"} <= named
    assert named <= fields, named - fields
    for setting in ("max_wait_ms", "max_batch", "max_queue"):
        assert f"`{setting}`" in text and setting in fields
    assert API_KEY_ENV_VAR in text
    assert "30 seconds by default" in text and ServeSettings().shutdown_timeout_s == 30
