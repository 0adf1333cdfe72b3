-- luacheck settings for make lint: Lua 5.4, busted's globals in specs.
std = "lua54"
max_line_length = 120
-- Specs hold long literal expectations (digests, messages) on one line.
files["spec"] = { std = "+busted", max_line_length = 180 }
files["examples/**/*_spec.lua"] = { std = "+busted", max_line_length = 180 }
exclude_files = { "build", "build-asan" }
