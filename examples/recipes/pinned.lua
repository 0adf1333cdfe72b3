--[[
examples/recipes/pinned.lua: tags pinned to digests.

Options: pins = { ["library/alpine:3.20"] = "sha256:...", ... } keyed by the
upstream repository and tag. A pinned tag is served as that exact manifest
(whatever the tag points to upstream now); other tags pass through. Pulls
by digest are untouched.
Tested by pinned_spec.lua beside it; pinned.json runs it.
]]
local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"

return {
    resolve = function(req)
        local where, err = mirror.resolve(req)
        if not where then
            return nil, err
        end
        local pins = regfacade.config.options.pins or {}
        if req.kind == "manifest" and where.reference then
            local pin = pins[where.repository .. ":" .. where.reference]
            if pin then
                where.reference = pin
            end
        end
        return where
    end,
}
