--[[
examples/recipes/layer_for_some.lua: an extra layer for some repositories only.

Options: with_tools = { "acme/" }: repository prefixes that get the layer
named "tools" (config "layers": { "tools": { "file": "tools.tar.gz" } })
on top of their own layers, and /opt/tools/bin in front of PATH. Other
repositories are served as the upstream has them.
Tested by layer_for_some_spec.lua beside it; layer_for_some.json runs it.
]]
local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"
local image = require "regfacade.image"
local rules = require "regfacade.rules"

local wants_tools = rules.prefix(regfacade.config.options.with_tools or {})

return {
    resolve = function(req)
        local where, err = mirror.resolve(req)
        if where and wants_tools(req.repository) then
            where.layers = { "base", "tools" }
        end
        return where, err
    end,

    rewrite = function(img, req)
        if wants_tools(req.repository) then
            image.env_prepend(img.config, "PATH", "/opt/tools/bin:")
        end
    end,
}
