-- regfacade.image: env, label and annotation helpers on plain tables, and
-- env modifiers carried by added images.

describe("regfacade.image", function()
    local image

    before_each(function()
        package.loaded["regfacade"] = { config = { upstreams = {} }, log = function() end }
        package.loaded["regfacade.image"] = nil
        image = require "regfacade.image"
    end)

    after_each(function()
        package.loaded["regfacade"] = nil
        package.loaded["regfacade.image"] = nil
    end)

    local function cfg_with(env)
        return { architecture = "amd64", os = "linux",
                 config = { Env = env, Cmd = { "sh" } },
                 rootfs = { type = "layers", diff_ids = {} } }
    end

    describe("env_get", function()
        it("returns a variable's value", function()
            local cfg = cfg_with({ "PATH=/usr/bin", "HOME=/root" })
            assert.are.equal("/usr/bin", image.env_get(cfg, "PATH"))
            assert.are.equal("/root", image.env_get(cfg, "HOME"))
        end)

        it("returns values containing '=' and empty values whole", function()
            local cfg = cfg_with({ "OPTS=a=b=c", "EMPTY=" })
            assert.are.equal("a=b=c", image.env_get(cfg, "OPTS"))
            assert.are.equal("", image.env_get(cfg, "EMPTY"))
        end)

        it("returns nil for an unset variable and for a name that is only a prefix", function()
            local cfg = cfg_with({ "PATHX=1", "XPATH=2", "PATH" })
            assert.is_nil(image.env_get(cfg, "PATH"))
            assert.is_nil(image.env_get(cfg, "PAT"))
        end)

        it("returns the last entry when a name repeats", function()
            assert.are.equal("2", image.env_get(cfg_with({ "A=1", "B=x", "A=2" }), "A"))
        end)

        it("copes with missing config, Env or a JSON null, creating nothing", function()
            local cfg = {}
            assert.is_nil(image.env_get(cfg, "PATH"))
            assert.are.same({}, cfg)
            cfg = { config = {} }
            assert.is_nil(image.env_get(cfg, "PATH"))
            assert.are.same({ config = {} }, cfg)
            local null = io.stdout -- a userdata, like cjson.null
            assert.is_nil(image.env_get({ config = { Env = null } }, "PATH"))
        end)
    end)

    describe("env_set", function()
        it("replaces a variable where it stands", function()
            local cfg = cfg_with({ "A=1", "PATH=/bin", "B=2" })
            assert.are.equal("/usr/bin", image.env_set(cfg, "PATH", "/usr/bin"))
            assert.are.same({ "A=1", "PATH=/usr/bin", "B=2" }, cfg.config.Env)
        end)

        it("appends a new variable at the end", function()
            local cfg = cfg_with({ "A=1", "B=2" })
            image.env_set(cfg, "C", "3")
            assert.are.same({ "A=1", "B=2", "C=3" }, cfg.config.Env)
        end)

        it("keeps the first position and drops later duplicates", function()
            local cfg = cfg_with({ "A=1", "X=a", "B=2", "X=b", "C=3" })
            image.env_set(cfg, "X", "new")
            assert.are.same({ "A=1", "X=new", "B=2", "C=3" }, cfg.config.Env)
        end)

        it("leaves entries without '=' and non-strings alone", function()
            local cfg = cfg_with({ "X", 5, "Y=1" })
            image.env_set(cfg, "X", "1")
            assert.are.same({ "X", 5, "Y=1", "X=1" }, cfg.config.Env)
        end)

        it("accepts an empty value", function()
            local cfg = cfg_with({ "A=1" })
            image.env_set(cfg, "A", "")
            assert.are.same({ "A=" }, cfg.config.Env)
        end)

        it("creates config and Env when missing or null, keeping other fields", function()
            local cfg = { architecture = "arm64" }
            image.env_set(cfg, "A", "1")
            assert.are.same({ architecture = "arm64", config = { Env = { "A=1" } } }, cfg)

            cfg = { config = { User = "1000" } }
            image.env_set(cfg, "A", "1")
            assert.are.same({ config = { User = "1000", Env = { "A=1" } } }, cfg)

            cfg = { config = { Env = io.stdout } } -- a JSON null sentinel (userdata)
            image.env_set(cfg, "A", "1")
            assert.are.same({ "A=1" }, cfg.config.Env)
        end)

        it("treats regfacade.null as missing when the core provides it", function()
            local null = setmetatable({}, { __name = "null" })
            package.loaded["regfacade"].null = null
            local cfg = { config = { Env = null, Labels = null } }
            image.env_set(cfg, "A", "1")
            image.label_set(cfg, "k", "v")
            assert.are.same({ "A=1" }, cfg.config.Env)
            assert.are.same({ k = "v" }, cfg.config.Labels)
            assert.are.same({}, null)
        end)

        it("works without any core module loaded", function()
            package.loaded["regfacade"] = nil
            local cfg = cfg_with({ "A=1" })
            image.env_set(cfg, "A", "2")
            image.label_set(cfg, "k", "v")
            assert.are.same({ "A=2" }, cfg.config.Env)
            assert.are.same({ k = "v" }, cfg.config.Labels)
        end)

        it("refuses an Env that is neither an array nor null", function()
            assert.has_error(function() image.env_set({ config = { Env = "A=1" } }, "A", "1") end,
                "image.env_set: config.Env is a string, expected an array")
            assert.has_error(function() image.env_set({ config = 7 }, "A", "1") end,
                "image.env_set: config is a number, expected a table")
        end)

        it("checks its arguments, naming itself", function()
            assert.has_error(function() image.env_set(nil, "A", "1") end,
                "image.env_set: cfg must be a table, got nil")
            assert.has_error(function() image.env_set({}, "", "1") end,
                "image.env_set: name must be a non-empty string without '=', got \"\"")
            assert.has_error(function() image.env_set({}, "A=B", "1") end,
                "image.env_set: name must be a non-empty string without '=', got \"A=B\"")
            assert.has_error(function() image.env_set({}, 42, "1") end,
                "image.env_set: name must be a non-empty string without '=', got number")
            assert.has_error(function() image.env_set({}, "A", nil) end,
                "image.env_set: value must be a string, got nil")
            assert.has_error(function() image.env_set({}, "A", 1) end,
                "image.env_set: value must be a string, got number")
        end)
    end)

    describe("env_append", function()
        it("puts the suffix after the old value, in place", function()
            local cfg = cfg_with({ "A=1", "PATH=/usr/bin", "B=2" })
            assert.are.equal("/usr/bin:/ide/bin", image.env_append(cfg, "PATH", ":/ide/bin"))
            assert.are.same({ "A=1", "PATH=/usr/bin:/ide/bin", "B=2" }, cfg.config.Env)
        end)

        it("sets the suffix alone when the variable is unset", function()
            local cfg = cfg_with({ "A=1" })
            image.env_append(cfg, "PATH", "/ide/bin")
            assert.are.same({ "A=1", "PATH=/ide/bin" }, cfg.config.Env)
            cfg = {}
            image.env_append(cfg, "PATH", "/ide/bin")
            assert.are.same({ config = { Env = { "PATH=/ide/bin" } } }, cfg)
        end)

        it("appends to the effective (last) value of a repeated name", function()
            local cfg = cfg_with({ "P=a", "Q=1", "P=b" })
            image.env_append(cfg, "P", "+")
            assert.are.same({ "P=b+", "Q=1" }, cfg.config.Env)
        end)

        it("checks its arguments, naming itself", function()
            assert.has_error(function() image.env_append({}, "A=", "x") end,
                "image.env_append: name must be a non-empty string without '=', got \"A=\"")
            assert.has_error(function() image.env_append({}, "A", false) end,
                "image.env_append: suffix must be a string, got boolean")
            assert.has_error(function() image.env_append("cfg", "A", "x") end,
                "image.env_append: cfg must be a table, got string")
        end)
    end)

    describe("env_prepend", function()
        it("puts the prefix before the old value, in place", function()
            local cfg = cfg_with({ "A=1", "PATH=/usr/bin", "B=2" })
            assert.are.equal("/ide/bin:/usr/bin", image.env_prepend(cfg, "PATH", "/ide/bin:"))
            assert.are.same({ "A=1", "PATH=/ide/bin:/usr/bin", "B=2" }, cfg.config.Env)
        end)

        it("sets the prefix alone when the variable is unset", function()
            local cfg = cfg_with({})
            image.env_prepend(cfg, "PATH", "/ide/bin")
            assert.are.same({ "PATH=/ide/bin" }, cfg.config.Env)
        end)

        it("checks its arguments, naming itself", function()
            assert.has_error(function() image.env_prepend({}, nil, "x") end,
                "image.env_prepend: name must be a non-empty string without '=', got nil")
            assert.has_error(function() image.env_prepend({}, "A", {}) end,
                "image.env_prepend: prefix must be a string, got table")
        end)
    end)

    describe("env_unset", function()
        it("removes every entry of the variable, keeping the others' order", function()
            local cfg = cfg_with({ "A=1", "D=x", "B=2", "D=y", "C=3" })
            assert.are.equal("y", image.env_unset(cfg, "D"))
            assert.are.same({ "A=1", "B=2", "C=3" }, cfg.config.Env)
        end)

        it("returns nil and creates nothing when the variable is not there", function()
            local cfg = cfg_with({ "A=1" })
            assert.is_nil(image.env_unset(cfg, "B"))
            assert.are.same({ "A=1" }, cfg.config.Env)
            cfg = {}
            assert.is_nil(image.env_unset(cfg, "B"))
            assert.are.same({}, cfg)
        end)

        it("checks its arguments, naming itself", function()
            assert.has_error(function() image.env_unset({}, "") end,
                "image.env_unset: name must be a non-empty string without '=', got \"\"")
        end)
    end)

    describe("label_set and label_remove", function()
        it("set a label, creating config and Labels when missing or null", function()
            local cfg = { os = "linux" }
            assert.are.equal("v", image.label_set(cfg, "org.example.k", "v"))
            assert.are.same({ os = "linux", config = { Labels = { ["org.example.k"] = "v" } } }, cfg)
            cfg = { config = { Labels = io.stdout } }
            image.label_set(cfg, "a", "b")
            assert.are.same({ a = "b" }, cfg.config.Labels)
        end)

        it("replace an existing label and keep the others", function()
            local cfg = { config = { Labels = { a = "1", b = "2" } } }
            image.label_set(cfg, "a", "9")
            assert.are.same({ a = "9", b = "2" }, cfg.config.Labels)
        end)

        it("remove a label, returning its value", function()
            local cfg = { config = { Labels = { a = "1", b = "2" } } }
            assert.are.equal("1", image.label_remove(cfg, "a"))
            assert.are.same({ b = "2" }, cfg.config.Labels)
            assert.is_nil(image.label_remove(cfg, "a"))
        end)

        it("remove creates nothing", function()
            local cfg = {}
            assert.is_nil(image.label_remove(cfg, "a"))
            assert.are.same({}, cfg)
            cfg = { config = {} }
            assert.is_nil(image.label_remove(cfg, "a"))
            assert.are.same({ config = {} }, cfg)
        end)

        it("check their arguments, naming themselves", function()
            assert.has_error(function() image.label_set({}, "", "v") end,
                "image.label_set: key must be a non-empty string, got an empty string")
            assert.has_error(function() image.label_set({}, "k", 1) end,
                "image.label_set: value must be a string, got number")
            assert.has_error(function() image.label_set({ config = { Labels = "x" } }, "k", "v") end,
                "image.label_set: config.Labels is a string, expected a table")
            assert.has_error(function() image.label_remove({}, nil) end,
                "image.label_remove: key must be a non-empty string, got nil")
        end)
    end)

    describe("annotation_set and annotation_remove", function()
        it("set an annotation, creating annotations when missing", function()
            local m = { schemaVersion = 2, layers = {} }
            assert.are.equal("acme/ide", image.annotation_set(m, "org.example.workspace", "acme/ide"))
            assert.are.same({ schemaVersion = 2, layers = {},
                              annotations = { ["org.example.workspace"] = "acme/ide" } }, m)
        end)

        it("keep the other annotations", function()
            local m = { annotations = { a = "1" } }
            image.annotation_set(m, "b", "2")
            assert.are.same({ a = "1", b = "2" }, m.annotations)
            assert.are.equal("1", image.annotation_remove(m, "a"))
            assert.are.same({ b = "2" }, m.annotations)
            assert.is_nil(image.annotation_remove({}, "a"))
        end)

        it("check their arguments, naming themselves", function()
            assert.has_error(function() image.annotation_set(nil, "k", "v") end,
                "image.annotation_set: manifest must be a table, got nil")
            assert.has_error(function() image.annotation_set({}, "k", nil) end,
                "image.annotation_set: value must be a string, got nil")
            assert.has_error(function() image.annotation_remove({}, 3) end,
                "image.annotation_remove: key must be a non-empty string, got number")
        end)
    end)

    describe("apply_env_modifiers", function()
        local function ide(env)
            return { config = { Env = env } }
        end

        it("applies SET, APPEND and PREPEND as named (model-style entries)", function()
            local cfg = cfg_with({ "PATH=/usr/bin", "LANG=C", "HOME=/root" })
            local added = ide({
                "PATH=/ide/only",                       -- not a modifier: ignored
                "GITPOD_ENV_SET_EDITOR=code",
                "GITPOD_ENV_APPEND_PATH=:/ide/bin",     -- append appends
                "GITPOD_ENV_PREPEND_LANG=en_US.",       -- prepend prepends
                "GITPOD_ENV_SET_HOME=/workspace",
            })
            assert.are.equal(4, image.apply_env_modifiers(cfg, added))
            assert.are.same({ "PATH=/usr/bin:/ide/bin", "LANG=en_US.C", "HOME=/workspace",
                              "EDITOR=code" }, cfg.config.Env)
        end)

        it("does what the name says for the model's own fixture entry", function()
            -- Gitpod's fixture layersrc_code_envs carries GITPOD_ENV_APPEND_PATH=/ide/bin:
            -- and its facade prepends it; ours appends, as named.
            local cfg = cfg_with({ "PATH=/usr/bin" })
            image.apply_env_modifiers(cfg, ide({ "GITPOD_ENV_APPEND_PATH=/ide/bin:" }))
            assert.are.same({ "PATH=/usr/bin/ide/bin:" }, cfg.config.Env)
            cfg = cfg_with({ "PATH=/usr/bin" })
            image.apply_env_modifiers(cfg, ide({ "GITPOD_ENV_PREPEND_PATH=/ide/bin:" }))
            assert.are.same({ "PATH=/ide/bin:/usr/bin" }, cfg.config.Env)
        end)

        it("applies entries in order, each seeing the ones before", function()
            local cfg = cfg_with({})
            image.apply_env_modifiers(cfg, ide({
                "GITPOD_ENV_SET_X=b",
                "GITPOD_ENV_APPEND_X=c",
                "GITPOD_ENV_PREPEND_X=a",
                "GITPOD_ENV_SET_Y=1",
                "GITPOD_ENV_SET_Y=2",
            }))
            assert.are.same({ "X=abc", "Y=2" }, cfg.config.Env)
        end)

        it("keeps '=' and empty strings in values", function()
            local cfg = cfg_with({ "OPTS=-x" })
            image.apply_env_modifiers(cfg, ide({ "GITPOD_ENV_APPEND_OPTS= -Dk=v", "GITPOD_ENV_SET_E=" }))
            assert.are.same({ "OPTS=-x -Dk=v", "E=" }, cfg.config.Env)
        end)

        it("ignores other entries: unknown operations, no name, no '=', wrong case", function()
            local cfg = cfg_with({ "A=1" })
            local n = image.apply_env_modifiers(cfg, ide({
                "GITPOD_ENV_UNSET_A=1", "GITPOD_ENV_SET_=x", "GITPOD_ENV_SET_B",
                "gitpod_env_set_C=1", "GITPOD_ENV_SETD=1", "OTHER_SET_E=1", 42,
            }))
            assert.are.equal(0, n)
            assert.are.same({ "A=1" }, cfg.config.Env)
        end)

        it("takes another prefix from opts.prefix, and then ignores the default one", function()
            local cfg = cfg_with({ "PATH=/usr/bin" })
            local n = image.apply_env_modifiers(cfg, ide({
                "ACME_PREPEND_PATH=/opt/acme/bin:",
                "GITPOD_ENV_SET_X=1",
                "ACME_SET_ACME=1",
            }), { prefix = "ACME_" })
            assert.are.equal(2, n)
            assert.are.same({ "PATH=/opt/acme/bin:/usr/bin", "ACME=1" }, cfg.config.Env)
        end)

        it("creates cfg's config and Env when missing", function()
            local cfg = {}
            image.apply_env_modifiers(cfg, ide({ "GITPOD_ENV_SET_A=1" }))
            assert.are.same({ config = { Env = { "A=1" } } }, cfg)
        end)

        it("applies nothing from an added image without config or Env, creating nothing", function()
            local cfg = {}
            assert.are.equal(0, image.apply_env_modifiers(cfg, {}))
            assert.are.equal(0, image.apply_env_modifiers(cfg, { config = {} }))
            assert.are.equal(0, image.apply_env_modifiers(cfg, { config = { Env = io.stdout } }))
            assert.are.same({}, cfg)
        end)

        it("leaves the added image untouched", function()
            local added = ide({ "GITPOD_ENV_SET_A=1", "B=2" })
            image.apply_env_modifiers(cfg_with({}), added)
            assert.are.same(ide({ "GITPOD_ENV_SET_A=1", "B=2" }), added)
        end)

        it("checks its arguments, naming itself", function()
            assert.has_error(function() image.apply_env_modifiers(nil, {}) end,
                "image.apply_env_modifiers: cfg must be a table, got nil")
            assert.has_error(function() image.apply_env_modifiers({}, "x") end,
                "image.apply_env_modifiers: added_cfg must be a table, got string")
            assert.has_error(function() image.apply_env_modifiers({}, {}, "ACME_") end,
                "image.apply_env_modifiers: opts must be a table, got string")
            assert.has_error(function() image.apply_env_modifiers({}, {}, { prefix = "" }) end,
                "image.apply_env_modifiers: opts.prefix must be a non-empty string, got an empty string")
            assert.has_error(function() image.apply_env_modifiers({}, {}, { prefx = "A_" }) end,
                'image.apply_env_modifiers: unknown option "prefx" (known: prefix)')
        end)
    end)

    it("creates no globals", function()
        local before = {}
        for k in pairs(_G) do before[k] = true end
        local cfg = {}
        image.env_set(cfg, "A", "1")
        image.env_append(cfg, "A", "2")
        image.env_prepend(cfg, "A", "0")
        image.env_get(cfg, "A")
        image.env_unset(cfg, "A")
        image.label_set(cfg, "k", "v")
        image.label_remove(cfg, "k")
        image.annotation_set(cfg, "k", "v")
        image.apply_env_modifiers(cfg, { config = { Env = { "GITPOD_ENV_SET_B=1" } } })
        for k in pairs(_G) do
            assert.is_true(before[k] == true, "new global " .. tostring(k))
        end
    end)
end)
