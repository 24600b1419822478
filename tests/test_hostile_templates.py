"""Chat templates are code from strangers: every attack ends in one clean error, fast; real templates render as
transformers renders them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import copy_of, run_cli
from zipmoe.errors import ZipmoeError
from zipmoe.runtime import chat_template
from zipmoe.runtime.tokenizer import TextTokenizer, TokenizerError

FIXTURE = Path(__file__).parent / "fixtures" / "qwen2-moe-stdlib"
TOKENIZER_JSON = (FIXTURE / "tokenizer.json").read_text()
CONFIG = json.loads((FIXTURE / "tokenizer_config.json").read_text())  # eos and pad set, bos null
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": 'What\'s the weather in Paris? <b>now</b> & "later" — ünïcode'},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"z": 1, "city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "user", "content": "  And tomorrow?  "},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & later",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def tokenizer(template, files: dict[str, bytes] | None = None) -> TextTokenizer:
    return TextTokenizer(TOKENIZER_JSON, {**CONFIG, "chat_template": template}, files)


def render(template, messages=None) -> str:
    return tokenizer(template).apply_chat_template(messages or [{"role": "user", "content": "hi"}])


def refused(template, fragment: str = "", *, source=None, seconds: float = 3.0) -> str:
    """The one-line error ``template`` gives, checked to come fast and to name the template's source."""
    start = time.perf_counter()
    with pytest.raises(TokenizerError) as info:
        if source is None:
            render(template)
        else:
            tokenizer(None, {source: template}).apply_chat_template([{"role": "user", "content": "hi"}])
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert isinstance(info.value, ZipmoeError) and isinstance(info.value, ValueError)
    assert "\n" not in message and len(message) < 500, message
    assert message.startswith(f"chat template from {source or 'tokenizer_config.json'}"), message
    assert fragment in message, message
    assert elapsed < seconds, f"{elapsed:.1f} s: {message}"
    return message


# -- size bombs: refused before the memory is taken ------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{{ 'a' * 10**9 }}", "the * operator"),
        ("{{ [1, 2] * 10**9 }}", "the * operator"),
        ("{% set s = 'a' * 1000000 %}{{ ([s] * 1000)|length }}", "the * operator"),
        ("{{ 10 ** (10 ** 9) }}", "4,300 digits"),
        ("{{ 2 ** 100000 }}", "4,300 digits"),
        ("{% set n = 2 ** 10000 %}{{ n * n }}", "4,300 digits"),
        ("{{ 'a'.ljust(10**9) }}", "ljust() got the integer 1,000,000,000"),
        ("{{ 'a'.center(10**9) }}", "center()"),
        ("{{ 'a'.zfill(10**9) }}", "zfill()"),
        ("{{ 'a'|center(10**9) }}", "center()"),
        ("{{ '{:>1000000000}'.format('x') }}", "format()"),
        ("{{ '{:>{w}}'.format('x', w=10**9) }}", "format()"),
        ("{{ '{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}'.format('a' * 1000000) }}", "format()"),
        ("{{ '%1000000000s' % 'x' }}", "the % operator"),
        ("{{ '%*s' % (1000000, 'x') * 100 }}", "the * operator"),
        ("{{ '%s'|format('x' * 10**9) }}", "the * operator"),
        ("{{ ('y' * 100000).join(['x'] * 100000) }}", "join()"),
        ("{{ (['x'] * 100000)|join('y' * 100000) }}", "join()"),
        ("{{ ('y' * 100000).join(range(100000)|map('string')) }}", "join()"),
        ("{% set s = 'a' * 100000 %}{{ s.replace('', s) }}", "replace()"),
        ("{% set s = 'a' * 100000 %}{{ s|replace('a', s) }}", "replace()"),
        ("{{ ('\\n' * 100000)|indent(100000) }}", "indent()"),
        ("{{ ('\\t' * 100000).expandtabs(100000) }}", "expandtabs()"),
        ("{% set s = 'a' * 100000 %}{{ s.translate({97: s}) }}", "translate()"),
        (
            "{% set s = 'a' * 1000000 %}{{ (s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s)|length }}",
            "~",
        ),
        ("{% set s = 'a' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s]|length }}", "a literal"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "+"),
        ("{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ d('ab', 64) }}", "~"),
        ("{{ ([''] * 100000)|map('center', 1000000)|list|length }}", "center()"),
        ("{{ [1]|batch(10**9, 'x')|list }}", "batch()"),
        ("{{ ([[1]] * 100000)|sum(start=[]) }}", "sum() adds numbers only"),
        ("{% set l = ['x' * 1000] * 10000 %}{{ l }}", "{{ }} output"),
        ("{{ ([1] * 1000000)|tojson(indent=100) }}", "tojson"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "the rendered prompt is longer than 1,000,000"),
        ("{% set x %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}{{ x|length }}", "output"),
        (
            "{% macro m() %}{% for i in range(100000) %}" + "0123456789" * 20 + "{% endfor %}{% endmacro %}{{ m() }}",
            "a block",
        ),
    ],
)
def test_size_bombs_are_refused_fast(template, fragment):
    refused(template, fragment)


# -- time bombs: the deadline ends them ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set s = 'x' * 100000 %}{% for c in s %}{% for d in s %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% if j is divisibleby 7 %}{% endif %}{% endfor %}"
        "{% endfor %}",
        "{% set l = range(100000)|list %}{{ l|select('in', l)|select('in', l)|list|length }}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "{% for x in range(100000) recursive %}{{ loop(range(100000)) }}{% endfor %}",
    ],
)
def test_endless_renders_stop_at_the_deadline(monkeypatch, template):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    message = refused(template, seconds=3.0)
    assert "rendering took longer than 0.3 s" in message or "RecursionError" in message


def test_the_default_deadline_stops_nested_loops_within_ten_seconds():
    refused("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "5 s", seconds=10)


# -- template errors: one line naming the source and line ----------------------------------------------------------


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("hello {% for %}", "line 1: Expected an expression"),
        ("a\nb\n{{ x }", "line 3: unexpected '}'"),
        ("{% if x %}unclosed", "line 1: Unexpected end of template"),
        ("{{ x|no_such_filter }}", "No filter named 'no_such_filter'"),
        ("{{ 'x'|wordwrap }}", "No filter named 'wordwrap'"),
        ("{{ foo.bar.baz }}", "line 1: 'foo' is undefined"),
        ("{{ lipsum(5) }}", "'lipsum' is undefined"),
        ("ok\n{{ messages[0].content.nope() }}", "line 2:"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
        ("x\n\n{{ 'a' + 1 }}", "line 3: TypeError"),
        ("{{ messages[7] + 1 }}", "list object has no element 7"),
        ("{{ range(10) * 'a' }}", "TypeError"),
        ("{% set ns = 1 %}{% set ns.a = 2 %}", "cannot assign attribute on non-namespace object"),
        ("{% include 'other.jinja' %}", "TypeError: no loader"),
        ("{% extends 'base.jinja' %}", "no loader"),
        ("{{ messages.append(1) }}", "unsafe"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ raise_exception('Only user and\\nassistant roles are supported!') }}", "line 1: Only user and assistant"),
        ("{{ raise_exception('x' * 5000) }}", "xxx..."),
        ("{{ strftime_now(42) }}", "TypeError"),
        ("{{ {}|tojson(indent=10**9) }}", "tojson() got the integer"),
        ("{{ ''|tojson }}{{ cycler(1)|tojson }}", "not JSON serializable"),
        ("{% if false %}x{% endif %}", "rendered an empty prompt"),
        ("{{ '   ' }}\n\n", "rendered an empty prompt"),
        ("", "rendered an empty prompt"),
        ("{{" + "(" * 100000 + "1" + ")" * 100000 + "}}", ""),
    ],
)
def test_every_template_error_is_one_line(template, fragment):
    refused(template, fragment)


@pytest.mark.parametrize(
    "value, fragment",
    [
        (42, "expected a string, got int"),
        ([1, 2], 'expected a list of {"name": ..., "template": ...} objects'),
        ([{"name": "tool_use", "template": "x"}], "named templates without \"default\" (names: 'tool_use')"),
        ({"rag": "x"}, 'without "default"'),
        ([{"name": "default", "template": 7}], "expected a string, got int"),
        ("x" * (chat_template.MAX_TEMPLATE_CHARS + 1), "1,000,001 characters (at most 1,000,000)"),
    ],
)
def test_template_values_that_are_not_templates(value, fragment):
    refused(value, fragment)


@pytest.mark.parametrize(
    "source, data, fragment",
    [
        ("chat_template.jinja", b"{{ messages }}\xff", "not valid UTF-8 (invalid start byte at byte 14)"),
        ("chat_template.jinja", b"{% endfor %}", "line 1: Encountered unknown tag 'endfor'"),
        ("chat_template.json", b'{"chat_template": ', "Expecting value"),
        ("chat_template.json", b"[" * 1000, "nested deeper than"),
        ("chat_template.json", b'{"template": "x"}', 'expected a JSON object with a "chat_template"'),
        ("chat_template.json", b'{"chat_template": "{{ 1 / 0 }}"}', "ZeroDivisionError"),
    ],
)
def test_template_files_that_are_not_templates(source, data, fragment):
    refused(data, fragment, source=source)


def test_template_sources_in_transformers_order():
    jinja, json_file = b"from the jinja file", json.dumps({"chat_template": "from the json file"}).encode()
    files = {"chat_template.jinja": jinja, "chat_template.json": json_file}
    user = [{"role": "user", "content": "hi"}]
    assert tokenizer("from the config", files).apply_chat_template(user) == "from the jinja file"
    del files["chat_template.jinja"]
    assert tokenizer("from the config", files).apply_chat_template(user) == "from the config"
    assert tokenizer(None, files).apply_chat_template(user) == "from the json file"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    assert render(named) == "default"
    with pytest.raises(TokenizerError, match="no chat template; run without --chat"):
        tokenizer(None).encode("hi", chat=True)
    assert tokenizer(42).encode("hi") == tokenizer(None).encode("hi")  # a bad template matters only to --chat


# -- the sandbox still holds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "escape",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__['datetime'] }}",
        "{{ self.__init__.__globals__ }}",
        "{{ range.__globals__ }}",
        "{{ dict.mro() }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
        "{{ ''|attr('__class__') }}",
        "{{ (''|attr('__class__')).__mro__ }}",
        "{{ '{0.__class__.__base__.__subclasses__}'.format('') }}",
        "{{ ''.format_map({}).__class__ }}",
        "{{ messages.pop() }}",
        "{{ messages[0].update(content='pwned') }}",
        "{{ messages[0].clear() }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ loop.__class__ }}",
        "{{ environment }}{{ config }}{{ request }}",
    ],
)
def test_escapes_are_still_blocked(escape):
    messages = [{"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer(escape + "ok").apply_chat_template(messages)
    except TokenizerError as exc:
        assert "\n" not in str(exc)
    else:
        assert rendered == "ok"
    assert messages == [{"role": "user", "content": "hi"}]


# -- compatibility: what transformers renders ----------------------------------------------------------------------

QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA = """{{- bos_token if bos_token is defined else '[no bos]' }}
{%- set date_string = strftime_now('%Y') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nYear: ' + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' ~ message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{{- eos_token }}|{{ pad_token is defined }}|{{ unk_token is defined }}
"""

LOOP_CONTROLS = """{% for m in messages %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{% if m.role == 'tool' %}{% break %}{% endif %}
[{{ loop.index }}/{{ loop.length }}{{ ' last' if loop.last }}] {{ m.role|upper }}: {{ m.content }}
{% endfor %}
{{ eos_token }}"""

GENERATION = """{% for m in messages %}
{% if m.role == 'assistant' %}
{% generation %}ASSISTANT: {{ m.content }}{{ eos_token }}{% endgeneration %}
{% else %}
{{ m.role }}: {{ m.content }}
{% endif %}
{% endfor %}"""

TOJSON = """{{ tools|tojson }}
{{ tools[0]|tojson(indent=2) }}
{{ messages[-1]|tojson(separators=(',', ':')) }}
{{ {'z': 1, 'a': [1, 2.5, none, true], 'é': '<&>'}|tojson }}
{{ {'z': 1, 'a': 2}|tojson(sort_keys=true) }}
{{ "quote\\" and \\u2028"|tojson(ensure_ascii=true) }}"""

KITCHEN_SINK = """{%- set ns = namespace(last_user=-1, roles=[]) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
last user at {{ ns.last_user }} of {{ messages|length }}
{% for m in messages[::-1] if m.content is string and m.content %}{{ loop.index }}.{{ m.role[:3] }} {% endfor %}
{{ messages|map(attribute='role')|unique|join(', ') }}
{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|map('trim')|list }}
{{ (messages|first).content|replace('terse', 'brief')|center(30) }}|{{ (messages|last).content|wordcount }}
{{ '%s-%03d' % ('x', 7) }} {{ '{}/{:>5}'.format('a', 'b') }} {{ '{role}'.format_map(messages[0]) }}
{{ messages[1].content.split('?')[0]|title }} {{ 'a\\tb'.expandtabs(4) }} {{ 'abc'.translate({97: 'A'}) }}
{{ "line one\\nline two"|indent(4, first=true) }}
{{ (messages|map(attribute='content')|join(' ~ '))|length }} {{ ['b', 'a']|sort|join }} {{ {'b': 1, 'a': 2}|dictsort }}
{{ range(5)|batch(2)|list }} {{ [3, 1, 2]|sum }} {{ [3, 1, 2]|max }} {{ 'x' ~ 1 ~ none ~ [1] }} {{ 2 ** 10 }} {{ -7 // 2 }}
{{ [1, 2] + [3] }} {{ (1, 2) * 2 }} {{ 'ab' * 3 }} {{ 3 * 'ab' }} {{ '%s' % [1, 2] }} {{ 10 % 3 }} {{ 'a' + 'b' }}
{{ messages[1]|tojson|length }} {{ messages[0]|items|list }} {{ dict(a=1)|tojson }} {{ cycler('x', 'y').next() }}
{%- macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{{ caller() if caller }}{% endmacro %}
{{ greet('you') }} {% call greet('caller', '?') %} (called){% endcall %}
{% filter upper %}filtered {{ messages[0].role }}{% endfilter %}
{% set captured %}{% for i in range(3) %}{{ i }}{% endfor %}{% endset %}{{ captured * 2 }}
{% autoescape true %}{{ '<b>' ~ messages[1].content }}{{ ['<i>']|join }}{% endautoescape %}
{%- if add_generation_prompt %}
<|assistant|>
{%- endif %}"""


@pytest.fixture(scope="module")
def transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    specials = {k: v for k, v in CONFIG.items() if k.endswith("_token") and v is not None}
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(FIXTURE / "tokenizer.json"), **specials)


@pytest.mark.parametrize(
    "template, tools",
    [
        (QWEN, TOOLS),
        (QWEN, None),
        (LLAMA, None),
        (LOOP_CONTROLS, None),
        (GENERATION, None),
        (TOJSON, TOOLS),
        (KITCHEN_SINK, None),
    ],
    ids=["qwen-tools", "qwen", "llama", "loop-controls", "generation", "tojson", "kitchen-sink"],
)
def test_renders_what_transformers_renders(transformers_tokenizer, template, tools):
    transformers_tokenizer.chat_template = template
    for messages, prompt in ((MESSAGES, True), (MESSAGES[:2], False)):
        expected = transformers_tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=prompt
        )
        assert tokenizer(template).apply_chat_template(messages, tools=tools, add_generation_prompt=prompt) == expected


def test_raise_exception_says_what_transformers_says(transformers_tokenizer):
    import jinja2

    messages = [{"role": "robot", "content": "beep"}]
    transformers_tokenizer.chat_template = LLAMA
    with pytest.raises(jinja2.TemplateError) as theirs:
        transformers_tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(TokenizerError) as ours:
        tokenizer(LLAMA).apply_chat_template(messages)
    line = next(i for i, text in enumerate(LLAMA.splitlines(), 1) if "raise_exception" in text)
    assert str(ours.value) == f"chat template from tokenizer_config.json: line {line}: {theirs.value}"


# -- through the CLI ---------------------------------------------------------------------------------------------


def test_cli_run_with_a_hostile_template_is_one_error_line(capsys, checkpoints, tmp_path):
    from zipmoe.pack import PackOptions, pack

    source = copy_of(checkpoints.demo("tiny"), tmp_path)
    config_path = source / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ bos_token }}\n{{ 'a' * 10**9 }}"
    config_path.write_text(json.dumps(config))
    (source / "chat_template.json").write_text(json.dumps({"chat_template": "not used"}))
    packed = tmp_path / "hostile.zmoe"
    pack(str(source), packed, PackOptions(coder=None, verify=False))  # fast: the template is what is tested
    code, out, err = run_cli(capsys, "run", str(packed), "hi", "--chat", "-n", "1", "--device", "cpu")
    assert code == 1 and out == "", err
    assert err.startswith("Error: chat template from tokenizer_config.json: line 2: the * operator"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run_cli(capsys, "run", str(packed), "hi", "-n", "1", "--device", "cpu", "--json")
    assert code == 0, err  # without --chat the template is never compiled
