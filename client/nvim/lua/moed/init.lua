-- moed for Neovim (0.7+, no dependencies): ghost-text completion from the
-- daemon's `infill`, and :Moe, which streams an answer into a scratch buffer.
--
-- It talks msgpack-rpc to the daemon's editor socket with Neovim's own rpc
-- channel (sockconnect(..., {rpc = true})). Streams are requested with
-- `callback = 'MoedEvent'`, so the daemon delivers each event as a call of that
-- Vim function (defined on first use), which hands it to M._on_event.

local M = {}
local api, fn = vim.api, vim.fn
local uv = vim.uv or vim.loop -- vim.uv from Neovim 0.10 on

M.config = {
  socket = nil, -- editor socket path; default: $MOED_RUNTIME_DIR, else `moectl status --json`, else the runtime dir
  auto = true, -- ghost text while typing in insert mode
  debounce_ms = 150,
  max_tokens = 64, -- per ghost-text completion
  t_max_ms = 3000, -- time budget of one completion
  context_lines = 200, -- lines before and after the cursor sent as prefix and suffix
  stop = nil, -- extra stop strings for completions, e.g. { '\n\n' }
  accept_key = '<C-l>', -- insert-mode key that accepts the ghost text (false: no mapping)
  chat = true, -- :Moe sends a chat message (false: a plain prompt)
  answer_max_tokens = 512,
  temperature = 0,
  retry_after_ms = 30000, -- after a connection failure, auto-completion waits this long
}

local state = {
  chan = nil,
  handlers = {}, -- request id -> { on_chunk, on_done }
  early = {}, -- events that arrived before their handler was registered
  ghost = nil,
  timer = nil,
  down_until = 0,
  ns = api.nvim_create_namespace('moed'),
  answers = 0,
}

local function split(text, sep)
  local out, start = {}, 1
  while true do
    local i = string.find(text, sep, start, true)
    if not i then
      out[#out + 1] = string.sub(text, start)
      return out
    end
    out[#out + 1] = string.sub(text, start, i - 1)
    start = i + #sep
  end
end

-- Connection -----------------------------------------------------------------

local function runtime_socket()
  local dir = vim.env.MOED_RUNTIME_DIR
  if not dir or dir == '' then
    if vim.env.XDG_RUNTIME_DIR and vim.env.XDG_RUNTIME_DIR ~= '' then
      dir = vim.env.XDG_RUNTIME_DIR .. '/moed'
    elseif fn.has('mac') == 1 then
      dir = vim.env.HOME .. '/Library/Caches/TemporaryItems/moed'
    else
      dir = '/tmp/runtime-' .. uv.getuid() .. '/moed'
    end
  end
  return dir .. '/editor.sock'
end

function M.socket_path()
  if M.config.socket then
    return M.config.socket
  end
  if not vim.env.MOED_RUNTIME_DIR and fn.executable('moectl') == 1 then
    local out = fn.system({ 'moectl', 'status', '--json' })
    if vim.v.shell_error == 0 then
      local ok, status = pcall(fn.json_decode, out)
      if ok and type(status) == 'table' and type(status.editor_socket) == 'string' then
        return status.editor_socket
      end
    end
  end
  return runtime_socket()
end

function M.channel()
  if state.chan then
    return state.chan
  end
  local path = M.socket_path()
  local ok, chan = pcall(fn.sockconnect, 'pipe', path, { rpc = true })
  if not ok or chan == 0 then
    return nil, 'cannot connect to moed at ' .. path .. ' (is it running? `moectl start`): ' .. tostring(chan)
  end
  state.chan = chan
  return chan
end

function M.disconnect()
  if state.chan then
    pcall(fn.chanclose, state.chan)
  end
  state.chan = nil
  state.handlers, state.early = {}, {}
end

-- A call of `method` with one map; (result) or (nil, error text). The daemon's
-- errors read "<code>: <message>"; anything else means the channel is gone.
function M.request(method, params)
  local chan, err = M.channel()
  if not chan then
    return nil, err
  end
  local ok, res = pcall(vim.rpcrequest, chan, method, params or {})
  if ok then
    return res
  end
  local msg = tostring(res)
  local server = msg:match('\n(%l[%l_]*: .*)$')
  if server then
    return nil, server
  end
  M.disconnect()
  return nil, msg
end

function M._on_event(event, id, data)
  local h = state.handlers[id]
  if not h then
    local pending = state.early[id] or {}
    if #pending < 1000 then
      pending[#pending + 1] = { event, data }
      state.early[id] = pending
    end
    return
  end
  if event == 'moed_chunk' then
    h.on_chunk(data)
  elseif event == 'moed_done' then
    state.handlers[id] = nil
    h.on_done(data)
  end
end

-- Start a streamed `generate` or `infill`; (request id) or (nil, error).
function M.stream(method, params, on_chunk, on_done)
  if fn.exists('*MoedEvent') == 0 then
    -- The daemon streams events by calling this Vim function over the rpc channel
    -- (nvim_call_function): stock Neovim routes no other notifications to Lua.
    vim.cmd([[
      function! MoedEvent(event, id, data) abort
        call luaeval('require("moed")._on_event(_A[1], _A[2], _A[3])', [a:event, a:id, a:data])
      endfunction
    ]])
  end
  params.stream = true
  params.callback = 'MoedEvent'
  local res, err = M.request(method, params)
  if not res then
    return nil, err
  end
  local id = res.id
  state.handlers[id] = { on_chunk = on_chunk, on_done = on_done }
  local pending = state.early[id]
  state.early[id] = nil
  for _, e in ipairs(pending or {}) do
    M._on_event(e[1], id, e[2])
  end
  return id
end

function M.cancel(id)
  if id and state.handlers[id] then
    M.request('cancel', { id = id })
  end
end

-- Ghost text -----------------------------------------------------------------

local function render(g)
  if state.ghost ~= g or not api.nvim_buf_is_valid(g.buf) then
    return
  end
  if api.nvim_buf_get_changedtick(g.buf) ~= g.tick or g.text == '' then
    return
  end
  local lines = split(g.text, '\n')
  local line = api.nvim_buf_get_lines(g.buf, g.row, g.row + 1, false)[1] or ''
  local opts = {
    id = g.mark,
    virt_text = { { lines[1], 'Comment' } },
    -- At the end of a line the text shows where it would go; mid-line it would hide what follows.
    virt_text_pos = (g.col >= #line) and 'overlay' or 'eol',
    hl_mode = 'combine',
  }
  if #lines > 1 then
    local rest = {}
    for i = 2, #lines do
      rest[#rest + 1] = { { lines[i], 'Comment' } }
    end
    opts.virt_lines = rest
  end
  g.mark = api.nvim_buf_set_extmark(g.buf, state.ns, g.row, g.col, opts)
end

-- The current suggestion: { text, done, info, error } or nil.
function M.ghost()
  return state.ghost
end

function M.dismiss()
  local g = state.ghost
  state.ghost = nil
  if g then
    if api.nvim_buf_is_valid(g.buf) then
      api.nvim_buf_clear_namespace(g.buf, state.ns, 0, -1)
    end
    if not g.done then
      M.cancel(g.id)
    end
  end
end

-- Ask for a completion at the cursor; shows as ghost text while it streams.
function M.complete()
  local buf = api.nvim_get_current_buf()
  local cursor = api.nvim_win_get_cursor(0)
  local row, col = cursor[1], cursor[2]
  local first = math.max(1, row - M.config.context_lines)
  local last = math.min(api.nvim_buf_line_count(buf), row + M.config.context_lines)
  local before = api.nvim_buf_get_lines(buf, first - 1, row, false)
  local after = api.nvim_buf_get_lines(buf, row - 1, last, false)
  local line = before[#before] or ''
  before[#before] = string.sub(line, 1, col)
  after[1] = string.sub(line, col + 1)
  M.dismiss()
  local g = { buf = buf, row = row - 1, col = col, text = '', done = false, tick = api.nvim_buf_get_changedtick(buf) }
  state.ghost = g
  local params = {
    prefix = table.concat(before, '\n'),
    suffix = table.concat(after, '\n'),
    buffer = buf, -- the daemon cancels this buffer's older request
    max_tokens = M.config.max_tokens,
    t_max_ms = M.config.t_max_ms,
    temperature = M.config.temperature,
  }
  if M.config.stop then
    params.stop = M.config.stop
  end
  local id, err = M.stream('infill', params, function(text)
    g.text = g.text .. text
    render(g)
  end, function(info)
    g.done, g.info = true, info
    if type(info) == 'table' and type(info.error) == 'table' then
      g.error = info.error.code .. ': ' .. info.error.message
    end
    render(g)
  end)
  if not id then
    g.done, g.error = true, err
    if state.ghost == g then
      state.ghost = nil
    end
    return nil, err
  end
  g.id = id
  return id
end

-- Insert the ghost text at the cursor; false when there is none to insert.
function M.accept()
  local g = state.ghost
  if not g or g.text == '' or api.nvim_get_current_buf() ~= g.buf or api.nvim_buf_get_changedtick(g.buf) ~= g.tick then
    return false
  end
  local lines = split(g.text, '\n')
  M.dismiss()
  api.nvim_buf_set_text(g.buf, g.row, g.col, g.row, g.col, lines)
  local end_row = g.row + #lines - 1
  local end_col = (#lines == 1) and (g.col + #lines[1]) or #lines[#lines]
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  return true
end

local function auto_complete()
  if uv.now() < state.down_until or vim.bo.buftype ~= '' then -- files only: not prompts, terminals, answers
    return
  end
  state.timer = state.timer or uv.new_timer()
  state.timer:stop()
  state.timer:start(M.config.debounce_ms, 0, vim.schedule_wrap(function()
    if string.sub(api.nvim_get_mode().mode, 1, 1) ~= 'i' then
      return
    end
    local _, err = M.complete()
    if err and not err:match('^%l[%l_]*: ') then
      state.down_until = uv.now() + M.config.retry_after_ms
      vim.notify('moed: ' .. err, vim.log.levels.WARN)
    end
  end))
end

-- :Moe -------------------------------------------------------------------------

local function append(buf, text)
  if not api.nvim_buf_is_valid(buf) then
    return
  end
  local last = api.nvim_buf_line_count(buf)
  local parts = split(text, '\n')
  parts[1] = (api.nvim_buf_get_lines(buf, last - 1, last, false)[1] or '') .. parts[1]
  api.nvim_buf_set_lines(buf, last - 1, last, false, parts)
end

-- Send `prompt` (and the lines line1..line2 when range > 0) and stream the
-- answer into a new scratch buffer; returns that buffer.
function M.ask(prompt, range, line1, line2)
  local selection
  if range and range > 0 then
    selection = table.concat(api.nvim_buf_get_lines(0, line1 - 1, line2, false), '\n')
  end
  prompt = prompt or ''
  if prompt == '' and not selection then
    vim.notify('moed: :Moe wants a prompt, a selection, or both', vim.log.levels.ERROR)
    return nil
  end
  local content = prompt
  if selection then
    content = (prompt ~= '') and (prompt .. '\n\n' .. selection) or selection
  end
  vim.cmd('botright new')
  local buf = api.nvim_get_current_buf()
  state.answers = state.answers + 1
  vim.bo[buf].buftype = 'nofile'
  vim.bo[buf].bufhidden = 'wipe'
  vim.bo[buf].swapfile = false
  vim.bo[buf].filetype = 'markdown'
  pcall(api.nvim_buf_set_name, buf, 'moe://answer/' .. state.answers)
  local params = { max_tokens = M.config.answer_max_tokens, temperature = M.config.temperature }
  if M.config.chat then
    params.messages = { { role = 'user', content = content } }
  else
    params.prompt = content
  end
  local retried, current = false, nil
  local on_done
  local function on_chunk(text)
    append(buf, text)
  end
  local function start()
    local id, err = M.stream('generate', params, on_chunk, on_done)
    if id then
      current = id
      if api.nvim_buf_is_valid(buf) then
        api.nvim_buf_set_var(buf, 'moed_request', id)
      end
    end
    return id, err
  end
  on_done = function(info)
    if not api.nvim_buf_is_valid(buf) then
      return
    end
    local e = type(info) == 'table' and type(info.error) == 'table' and info.error or nil
    if e and params.messages and not retried and tostring(e.message):find('no chat template', 1, true) then
      -- A model without a chat template (a plain code model) continues the text instead.
      retried, params.messages, params.prompt = true, nil, content
      local _, err = start()
      if not err then
        return
      end
      e = { code = 'client', message = err }
      info = { finish_reason = 'error', error = e }
    end
    api.nvim_buf_set_var(buf, 'moed_done', info)
    if e then
      append(buf, '\n[moed: ' .. e.code .. ': ' .. e.message .. ']')
    end
  end
  local id, err = start()
  if not id then
    append(buf, '[moed: ' .. err .. ']')
    api.nvim_buf_set_var(buf, 'moed_done', { finish_reason = 'error', error = { code = 'client', message = err } })
    return buf
  end
  api.nvim_create_autocmd('BufWipeout', {
    buffer = buf,
    once = true,
    callback = function()
      M.cancel(current)
    end,
  })
  return buf
end

function M.show_status()
  local status, err = M.request('status', {})
  if not status then
    vim.notify('moed: ' .. err, vim.log.levels.ERROR)
    return
  end
  local model = type(status.model) == 'table' and (status.model.display_name or status.model.name) or '?'
  local requests = type(status.requests) == 'table' and status.requests or {}
  print(string.format('moed %s: %s, %s active, %s queued', tostring(status.state), tostring(model), tostring(requests.active), tostring(requests.queued)))
end

-- Setup ----------------------------------------------------------------------

function M.setup(opts)
  M.config = vim.tbl_extend('force', M.config, opts or {})
  local group = api.nvim_create_augroup('moed', { clear = true })
  if M.config.auto then
    api.nvim_create_autocmd('TextChangedI', { group = group, callback = auto_complete })
    api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, { group = group, callback = M.dismiss })
    api.nvim_create_autocmd('CursorMovedI', {
      group = group,
      callback = function()
        local g = state.ghost
        if g then
          local c = api.nvim_win_get_cursor(0)
          if c[1] - 1 ~= g.row or c[2] ~= g.col then
            M.dismiss()
          end
        end
      end,
    })
  end
  if M.config.accept_key then
    vim.keymap.set('i', M.config.accept_key, function()
      M.accept()
    end, { desc = 'moed: accept the ghost text' })
  end
  return M
end

return M
