" moed: ghost-text completion and :Moe, talking msgpack-rpc to the moed daemon's editor socket.
" Needs Neovim 0.7+ and nothing else. Configure with  lua require('moed').setup({...})
if exists('g:loaded_moed') || !has('nvim-0.7')
  finish
endif
let g:loaded_moed = 1

command! -range -nargs=* Moe lua require('moed').ask(<q-args>, <range>, <line1>, <line2>)
command! MoeComplete lua require('moed').complete()
command! MoeAccept lua require('moed').accept()
command! MoeDismiss lua require('moed').dismiss()
command! MoeStatus lua require('moed').show_status()
